"""SLF Workbook: speech (+ 8x8 thumbnail) to face with a conditional diffusion model, and ablations of its inputs.

Importing the package prepares offline use before any hub-aware library is imported:
* `SLF_OFFLINE=1` turns hub access off (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE); models then load only from local
  folders and from packages. Unset, a user with internet loads SpeechBrain/deepface weights from their hubs.
* imagen-pytorch reads the T5 config at import time (a default argument). A config-only cache entry ships with the
  package and is copied into the Hugging Face cache when missing, so `import imagen_pytorch` works offline.
"""

from slf_utils.env import prepare_environment

prepare_environment()

__version__ = "0.1.0"
