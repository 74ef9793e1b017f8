"""Inference with a trained model, in one place: what ``eval``, ``predict`` and ``dual-check`` share.

* :mod:`cellduality.inference.generate` — decoding settings, the model spec (a folder, an adapter on a
  base), the Hugging Face and vLLM backends, and batched generation through a completion cache;
* :mod:`cellduality.inference.cache` — the completion cache on disk (keyed by what a completion depends
  on: model files, data, decoding), so adding a model to a comparison regenerates nothing else;
* :mod:`cellduality.inference.engine` — one model loaded lazily with an in-memory cache and a seed per
  sampled batch, and the label-free dual confidence of forward answers (``predict``'s best-of-N).

Why a floor of its own: eval, predict and the dual check each loaded models and generated; predict
imported eval's generation, so the generation and its cache sat in the evaluation application. Training
generates inside the trainer (``cellduality.train.generation``), on the live policy, and is not here.
"""
