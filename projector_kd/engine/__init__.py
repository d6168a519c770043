"""The run kit both tracks train, evaluate and export with (not the method: that is :mod:`projector_kd`).

``loop`` (the training loop both tracks run), ``steps`` (training steps without host reads), ``checkpoint`` (atomic
saves, safe loads, exact state-dict loading), ``config``, ``data`` (ImageFolder checks, images by name), ``fast_data``
(the fast CPU training loader), ``dali`` (GPU decoding with NVIDIA DALI), ``sampling`` (resumable sharded sampling),
``distributed`` (torchrun), ``signals`` (graceful stop), ``evaluation`` (top-1/top-5), ``fast`` (compile fallback,
CUDA flags), ``runs`` (run folders, logs), ``export`` (timm / Hugging Face folders), ``models`` (parameter counts),
``parity`` (fast path vs reference checks), ``portable`` (fixed CPU kernels and one thread, for figures that do not
depend on the x86-64 CPU), ``errors`` (one-line user errors) and ``cli`` (the entry points' ``main`` wrapper).
"""
