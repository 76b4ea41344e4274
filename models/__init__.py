"""models: the encoder and everything built from it, shared by learner, indexer and serving.

Floor 1 (see tests/unit/test_layers.py): imports only :mod:`freshrec`.

- :mod:`models.encoder`: the encoder interface and the PyTorch back end.
- :mod:`models.tokenize`: the fast tokenizer that matches it.
- :mod:`models.merge`: merging a LoRA adapter into the base model.
- :mod:`models.export`: ONNX export (fp32, int8) of a merged version.
- :mod:`models.onnx_encoder`: the ONNX Runtime back end (what serves).
- :mod:`models.backends`: ONNX Runtime and FAISS come from the ``cpu`` or ``gpu`` extra; the error when neither is there.
- :mod:`models.registry`: immutable, verified adapter versions (and the helpers every registry shares).
- :mod:`models.ranker`: the ranking model, LightGBM lambdarank or a small MLP, scored with numpy.
- :mod:`models.ranker_registry`: immutable, verified ranker versions and which one is active.
- :mod:`models.live_index`, :mod:`models.snapshot`: the live FAISS index and its on-disk form.
- :mod:`models.build`: building a complete index of a catalog with one encoder.
"""
