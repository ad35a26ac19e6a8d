"""The label query language: parser and vectorised evaluator."""
