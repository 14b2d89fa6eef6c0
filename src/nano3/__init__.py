"""nano3: reproducible Nemotron-3-Nano-class pretraining (data, blends, Megatron-Bridge training, Slurm)."""

import logging
import warnings

# megatron-core warns at import about the GPU-only libraries (Transformer Engine, Apex) that CPU
# stages never use; torch logs the missing CUDA runtime. Both are noise on a CPU machine.
warnings.filterwarnings("ignore", module=r"megatron\.")
warnings.filterwarnings("ignore", category=SyntaxWarning)
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
