"""DeiT track: conv-stem DeiT-Ti/S students distilled from RegNetY-160 with projector KD (docs/method.md).

``deit.models.create_student`` / ``create_teacher``, ``deit.checkpoint.load_student_checkpoint``,
``deit.engine.DeiTTrack`` (trained by ``projector_kd.engine.loop.TrainingLoop``), ``deit.benchmark.build_train_step``,
``deit.config.load_config``, ``deit.export.export_student``; CLI: ``python deit/main.py``. Importing ``deit`` registers
``deit_conv_tiny``, ``deit_conv_small`` and ``deit_conv_demo`` with timm (full timm models:
``timm.create_model('local-dir:FOLDER', pretrained=True)`` loads an exported folder).
"""

from . import models  # noqa: F401  (registers the students with timm)
