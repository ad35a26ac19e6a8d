"""The files beside SQL: sharded [CLS] and patch vectors (FAISS), the score matrix segments, the similar and text-search indexes."""
