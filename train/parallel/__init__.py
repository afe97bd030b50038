"""Parallelism applied to the model from outside it: the device mesh (``mesh``) and the
tensor-parallel plan (``tensor_parallel``). The model (model/llama.py) knows nothing of them."""
