"""Issue 12: schemathesis fuzzes the HTTP API from its own OpenAPI schema, on a small
EASE-trained MovieLens database (every item, the first 3,000 ratings): no 5xx, every
status and body as the schema declares, schema-violating requests refused. Examples are
bounded (hypothesis settings below) so the module runs in well under a minute."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    negative_data_rejection, positive_data_acceptance)

from polyrec import Engine  # noqa: E402

TOKEN = "fuzz-token"
RATINGS = 3000
#: examples per operation and generation mode (positive and negative data); a longer
#: hunt: POLYREC_FUZZ_EXAMPLES=500
EXAMPLES = int(os.environ.get("POLYREC_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory, ml100k_dir):
    """The app over a small EASE-trained database (copied per module: the fuzzer writes)."""
    from polyrec.serve.app import create_app
    tmp = tmp_path_factory.mktemp("fuzz")
    lines = (ml100k_dir / "ml-100k.inter").read_text().splitlines()
    subset = tmp / "subset.inter"
    subset.write_text("\n".join(lines[:RATINGS + 1]) + "\n")
    eng = Engine(tmp / "fuzz.db", device="cpu", entrypoints=False, progress=False,
                 encode_on_arrival=False)
    eng.ingest(ml100k_dir / "ml-100k.item", "items")
    eng.ingest(subset, "interactions")
    report = eng.train("ease", options={"l2": 500.0}, force=True)
    assert report.activated
    yield create_app(eng, token=TOKEN, check_interval=0.0)
    eng.close()


#: What only the database can refuse, never the schema: a filter field, a similarity
#: basis or an event kind this database does not have (kinds are configurable per
#: database, filter fields are the catalogue's attributes).
DATA_FIELDS = ("filters", "basis", "kind")
#: The fields of a validation error (named in its details) that the schema cannot check
#: either: an item image outside the image root (the server's and the store's
#: configuration, engine/ingest/images.py) and an event time given as text that is not
#: ISO 8601, or outside the accepted range (the one check of every path,
#: engine/ingest/interactions.py).
DATA_ERROR_FIELDS = ("image", "ts")


def refused_for_data(response) -> bool:  # type: ignore[no-untyped-def]
    """A 422 of the engine (not of the schema) about a field only the data can check."""
    if response.status_code != 422:
        return False
    body = response.json()
    details = body.get("details") or {}
    return body.get("error") in ("validation_error", "config_error") and (
        isinstance(details, dict) and details.get("field") in DATA_FIELDS + DATA_ERROR_FIELDS
        or any(f in body.get("message", "") for f in DATA_FIELDS))


def operations(app):  # type: ignore[no-untyped-def]
    """Every operation of the app's own OpenAPI schema (schemathesis)."""
    api = schemathesis.openapi.from_asgi("/openapi.json", app)
    return [result.ok() for result in api.get_all_operations()]


@pytest.mark.slow  # about 15 s with the fixture
@pytest.mark.parametrize("mode", ["positive", "negative", "positive-again"])
def test_api_conforms_to_its_schema(fuzz_app, mode):
    """Every generated request (schema-valid with ``positive``, schema-violating with
    ``negative``) gets an answer the schema declares, never a 5xx; a violating request
    is refused. Half of them carry the token, so the writes are exercised too."""
    from hypothesis import given
    from schemathesis.generation import GenerationMode
    generation = GenerationMode(mode.split("-")[0])  # again: after the writes of the others
    failures = []
    for operation in operations(fuzz_app):
        @given(case=operation.as_strategy(generation_mode=generation))
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):  # type: ignore[no-untyped-def]
            authorized = len(repr(case.body)) % 2 == 0
            headers = {"Authorization": f"Bearer {TOKEN}"} if authorized else None
            response = case.call(headers=headers)
            excluded = [positive_data_acceptance] if refused_for_data(response) else []
            if response.status_code == 413:  # over the size limit: refused, by its own status
                excluded.append(negative_data_rejection)
            case.validate_response(response, excluded_checks=excluded, headers=headers)

        try:
            run()
        except Unsatisfiable:
            assert mode.startswith("negative")  # nothing to negate in GET /health, GET /models
        except Exception as exc:  # noqa: BLE001 - collect every operation's failure
            failures.append(f"{operation.label}: {str(exc)[:3000]}")
    assert not failures, "\n\n".join(failures)
