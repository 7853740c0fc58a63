"""Task files: one declarative YAML/JSON file per task, parsed once into frozen, typed config objects.

A task file under `pipelines/` (or any path) says everything about a segmentation problem: labels,
modality, dimensions, spacing, intensities, patch size, sampling, augmentation, network, loss,
optimiser, schedule and inference. Unknown keys and bad values fail here, naming the file and the key,
so that a typo never silently falls back to a default.

`task` declares the classes, `parse` validates a mapping into them, `files` finds and reads task files;
every public name is importable from `medseg.config`.
"""

from medseg.config.files import (
    PACKAGE_DIR,
    available_tasks,
    load_task,
    pipelines_dirs,
    read_labels_file,
    read_mapping,
    sample_data_dir,
)
from medseg.config.parse import parse_task, task_to_dict
from medseg.config.task import (
    CASE_ORGAN,
    DEFAULT_COLORS,
    AffineAug,
    Augmentation,
    BlurAug,
    ContrastAug,
    ElasticAug,
    FlipAug,
    GammaAug,
    Inference,
    Intensity,
    Label,
    Loss,
    Network,
    NoiseAug,
    Optimizer,
    PATIENT_AXES,
    Sampling,
    Schedule,
    Task,
)

__all__ = [
    "CASE_ORGAN",
    "DEFAULT_COLORS",
    "PACKAGE_DIR",
    "PATIENT_AXES",
    "AffineAug",
    "Augmentation",
    "BlurAug",
    "ContrastAug",
    "ElasticAug",
    "FlipAug",
    "GammaAug",
    "Inference",
    "Intensity",
    "Label",
    "Loss",
    "Network",
    "NoiseAug",
    "Optimizer",
    "Sampling",
    "Schedule",
    "Task",
    "available_tasks",
    "load_task",
    "parse_task",
    "pipelines_dirs",
    "read_labels_file",
    "read_mapping",
    "sample_data_dir",
    "task_to_dict",
]
