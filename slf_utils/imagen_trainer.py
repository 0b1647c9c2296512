"""The ImagenTrainer as training runs it (diffusion._train_unet, benchmarks/train_speed.py): the preset's trainer
options, its precision (model.trainer.precision), the speed levers (model.trainer.compile, channels_last) and this
process's place among the processes `accelerate launch` started."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from einops import rearrange
from imagen_pytorch import ImagenTrainer

from slf_utils.basics import exists

# model.trainer.compile auto: a CPU training compiles its unet from this many steps on (compiles)
AUTO_COMPILE_STEPS = 2000


def training_precision(requested: str = "fp32") -> str:
    """model.trainer.precision -> what trains: `auto` is bf16 mixed precision on a CUDA device that supports it
    (Ampere and later: about twice the matmul rate of fp32 on tensor cores, the same exponent range, no loss
    scaling) and fp32 elsewhere - on a CPU bf16 autocast gains little (README: which to use where), so it is used
    there only when asked. ImagenTrainer trains on CUDA when there is one unless ACCELERATE_USE_CPU is set."""
    if requested != "auto":
        return requested
    on_cuda = torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")
    return "bf16" if on_cuda and torch.cuda.is_bf16_supported() else "fp32"


def trainer_options(preset: dict) -> dict:
    """The preset's ImagenTrainer arguments, its precision resolved (Accelerate's mixed_precision; fp32 = none) and
    the workbook's own speed levers (compile, channels_last: make_trainer applies them) left out."""
    opts = {k: v for k, v in preset.get("trainer", {}).items() if k not in ("compile", "channels_last")}
    precision = training_precision(opts.pop("precision", "fp32"))
    return opts | ({} if precision == "fp32" else {"precision": precision})


def make_trainer(imagen, k: int, preset: dict, t_cfg: dict) -> ImagenTrainer:
    """The ImagenTrainer of unet k as training runs it (benchmarks/train_speed.py times this one): the preset's
    trainer options (model.trainer), train.lr, train.ema, the learning-rate schedule, and the speed levers
    model.trainer.channels_last and model.trainer.compile."""
    # train.lr_schedule cosine: the learning rate decays to 0 over train.steps; a constant rate leaves the last
    # weights as noisy as the last batches (on the demo, recall moved by +-0.05 between checkpoints)
    schedule = {"cosine_decay_max_steps": int(t_cfg["steps"])} if t_cfg["lr_schedule"] == "cosine" else {}
    warmup = int(t_cfg["warmup_steps"])
    options = trainer_options(preset)
    _allow_precision(options)
    unet = imagen.unets[k - 1]
    if preset.get("trainer", {}).get("channels_last", False):
        unet.to(memory_format=torch.channels_last)
    trainer = ImagenTrainer(
        imagen,
        only_train_unet_number=k,
        use_ema=bool(t_cfg["ema"]),
        lr=float(t_cfg["lr"]),
        verbose=False,
        **schedule,
        **({"warmup_steps": warmup} if warmup else {}),
        **options,
    )
    if compiles(preset.get("trainer", {}).get("compile", False), trainer.device, int(t_cfg["steps"])):
        _compile_unet(unet)
    return trainer


def compiles(requested, device, steps: int) -> bool:
    """model.trainer.compile -> whether the unet is compiled. `auto`: on a CUDA device, and on a CPU where inductor
    can build its C++ kernels (a C++ compiler and the Python headers) for a training of at least AUTO_COMPILE_STEPS
    steps. Measured in `make demo` (docs/timings.md, training speed): a compiled step takes ~0.7x an eager one; the
    first step compiles for ~2.5 min with an empty inductor cache and ~12 s from a filled one (the grid's later
    processes read it), so a 3,000-step training is 1.05x faster cold and 1.46x warm."""
    if requested is False:
        return False
    if torch.device(device).type == "cuda":
        return True
    import torch._inductor.config as inductor  # only here: importing inductor takes a while

    compilers = [c for c in inductor.cpp.cxx if c]
    if requested is True and not any(shutil.which(c) for c in compilers):
        raise RuntimeError(
            f"model.trainer.compile: true on a CPU needs a C++ compiler (inductor writes C++; none of {compilers} "
            "found): install one (g++), or set compile: auto, which trains eager without one"
        )
    # without Python.h inductor's CPU kernels fail to build mid-training (a system Python without its -dev package)
    headers = (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()
    return requested is True or (steps >= AUTO_COMPILE_STEPS and headers and any(shutil.which(c) for c in compilers))


def _compile_unet(unet):
    """torch.compile (inductor) of a unet's forward. imagen-pytorch calls `unet.forward` directly (p_losses), so the
    instance's forward is replaced rather than the module wrapped: state-dict keys, checkpoints and Accelerate's
    wrappers stay as they are with eager. fallback_random: random draws inside the unet (the cond-drop mask) come
    from torch's generator as in eager, so a compiled run draws what the eager run draws."""
    # einops registers a backend per tensor type on first use and the compiled graph is guarded on that registry:
    # register tensors and parameters now, or the first eager use after the first compiled call recompiles it all
    for t in (torch.zeros(1), torch.nn.Parameter(torch.zeros(1))):
        rearrange(t, "a -> a")
    unet.forward = torch.compile(unet.forward, options={"fallback_random": True})


def _allow_precision(options: dict):
    """Accelerate keeps one mixed-precision setting per process (AcceleratorState) and refuses a trainer with another
    one: two systems of different precision trained from one notebook, or a benchmark of both. A lone process
    forgets the old setting; launched processes keep theirs."""
    from accelerate.state import AcceleratorState

    held = AcceleratorState._shared_state.get("_mixed_precision")
    if exists(held) and held != options.get("precision", "no") and _processes().num_processes == 1:
        AcceleratorState._reset_state()


def _processes() -> PartialState:
    """This process's place among the launched ones. `accelerate launch` marks CPU processes with ACCELERATE_USE_CPU,
    which only `Accelerator` reads: a bare `PartialState()` made first (as training does, before ImagenTrainer) fixes
    the shared state without it, and on a machine without GPUs every process then trains alone as rank 0 of 1,
    ungrouped, all writing the same checkpoint. Passing the flag on makes them join one gloo process group."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
