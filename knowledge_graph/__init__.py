"""The knowledge graph: networkx view over the store, builders, embeddings, paths."""
