"""m3netcore: lung nodule malignancy from micro, meso and macro views of a CT (M3Net).

The public API (see DESIGN.md):

    import m3netcore as m3
    model = m3.load_model("demo")
    image = m3.read_image(path_or_dicom_folder)
    results = m3.predict(model, image, [(x, y, z)], coords="LPS", explain=True)
"""

from m3netcore.checkpoint import Model, load_model, save_model
from m3netcore.crops import Preprocessing, ScaleSpec, default_preprocessing, extract_crops
from m3netcore.errors import M3NetInputError, M3NetWarning, ModelFileError
from m3netcore.io import read_image
from m3netcore.models import ARCHITECTURES, build_model
from m3netcore.predict import NoduleResult, predict

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "M3NetInputError",
    "M3NetWarning",
    "Model",
    "ModelFileError",
    "NoduleResult",
    "Preprocessing",
    "ScaleSpec",
    "build_model",
    "default_preprocessing",
    "extract_crops",
    "load_model",
    "predict",
    "read_image",
    "save_model",
]
