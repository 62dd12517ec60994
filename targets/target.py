"""Target descriptions: TOML data files resolved once into a frozen ``Target``.

Three concerns are kept apart (as LLVM and Arm's Vela do):
- ``Isa``: architecture and features (neon, dotprod, fp16, mve…);
- ``Tuning``: the runtime and the ops it has kernels for (which fusions may be emitted), preferred
  quantization, block sizes;
- ``MemoryMode``: RAM budget, where weights live (mmap'd file / flash / RAM), arena alignment, cache line,
  the external-data threshold and the constant-folding growth limit.

Targets are found by name among the ``*.toml`` files shipped beside this module; a path to a ``.toml``
file is accepted as well.
"""

from __future__ import annotations

import enum
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from lmc.targets.runtime_model import RuntimeModel
from lmc.core.errors import TargetError
from lmc.core.runtime import Int8Products


class WeightsPlacement(enum.Enum):
    MMAP = "mmap"    # weights file mapped read-only: clean pages, not counted in RAM peak
    FLASH = "flash"  # weights executed in place from flash
    RAM = "ram"      # weights copied into RAM: they count in the RAM peak


INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)     # int4 block sizes a target (or --block-size) may name
QUANTIZATIONS = ("int8", "int4", "w8a8")     # what tuning.preferred_quantization may name (lmc build --quantize)
VNNI_FEATURES = frozenset({"avxvnni", "avx512vnni", "avx10"})


class Int4Scheme(enum.Enum):
    """How an int4 block's codes map to values: ŵ = q·s with q in [−8, 7] (symmetric), or ŵ = (q − z)·s with
    q in [0, 15] and a 4-bit zero point z per block (asymmetric: a little less error, a zero point to read
    and subtract at every block of every product)."""
    SYMMETRIC = "symmetric"
    ASYMMETRIC = "asymmetric"


@dataclass(frozen=True)
class Isa:
    arch: str
    features: frozenset[str]
    emulator_cpu: str = ""          # qemu-user CPU model that runs this ISA elsewhere ("": none; lmc verify --on)

    @property
    def int8_products(self) -> Int8Products:
        """The integer GEMM this ISA gets from onnxruntime (``features`` decide: avx2 without a VNNI
        feature saturates pair sums; every Arm and VNNI path is exact)."""
        if "avx2" in self.features and not self.features & VNNI_FEATURES:
            return Int8Products.SATURATING_PAIRS
        return Int8Products.EXACT


def host_isa() -> Isa:
    """The machine running lmc, as an ``Isa``: its architecture and, on Linux x86, its CPU flags in the target
    files' spelling (``avx512_vnni`` → ``avx512vnni``, ``sse4_2`` → ``sse4.2``); no features where
    ``/proc/cpuinfo`` has no flags line. What the host's onnxruntime computes follows from it (a VNNI host's
    int8 GEMM is exact, an AVX-512 host's MLAS takes 16-lane float kernels)."""
    import platform

    features: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    for flag in line.split(":", 1)[1].split():
                        features.add(flag.replace("_", ".") if flag.startswith("sse4_") else flag.replace("_", ""))
                    break
    except OSError:
        pass
    return Isa(arch=platform.machine(), features=frozenset(features))


@dataclass(frozen=True)
class Tuning:
    runtime: str
    runtime_version: str
    max_opset: int
    allowed_domains: frozenset[str]
    fused_ops: frozenset[str]
    preferred_quantization: str
    int4_block_size: int
    int4_scheme: Int4Scheme = Int4Scheme.ASYMMETRIC
    nbits_accuracy_level: int = 0   # MatMulNBits compute: 4 = int8 activations (dot-product units), 0 = float
    int4_block_size_gptq: int | None = None   # the block when GPTQ runs (int4 with --calib); None: int4_block_size
    greedy_head_min_bytes: int = 0  # float lm heads from this size get the screened greedy path (0: never)

    def int4_block(self, gptq: bool) -> int:
        """The int4 block a build takes when ``--block-size`` is not given: ``int4_block_size_gptq`` when GPTQ
        compensates the rounding error (int4 with calibration data) and the target names one, else
        ``int4_block_size``."""
        return self.int4_block_size_gptq if gptq and self.int4_block_size_gptq else self.int4_block_size

    def can_emit(self, op: str, domain: str = "") -> bool:
        """True when the runtime has a kernel for ``domain.op`` (plain ``op`` for the ONNX domain)."""
        key = f"{domain}.{op}" if domain else op
        return domain in self.allowed_domains and key in self.fused_ops


@dataclass(frozen=True)
class MemoryMode:
    ram_bytes: int
    weights_placement: WeightsPlacement
    alignment: int
    external_data_threshold: int
    fold_max_bytes: int


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    isa: Isa
    tuning: Tuning
    memory: MemoryMode
    source: str
    runtime: RuntimeModel = field(default_factory=RuntimeModel)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "isa": {"arch": self.isa.arch, "features": sorted(self.isa.features),
                    "emulator_cpu": self.isa.emulator_cpu},
            "tuning": {
                "runtime": self.tuning.runtime,
                "runtime_version": self.tuning.runtime_version,
                "max_opset": self.tuning.max_opset,
                "allowed_domains": sorted(self.tuning.allowed_domains),
                "fused_ops": sorted(self.tuning.fused_ops),
                "preferred_quantization": self.tuning.preferred_quantization,
                "int4_block_size": self.tuning.int4_block_size,
                "int4_block_size_gptq": self.tuning.int4_block(gptq=True),
                "int4_scheme": self.tuning.int4_scheme.value,
                "nbits_accuracy_level": self.tuning.nbits_accuracy_level,
                "greedy_head_min_bytes": self.tuning.greedy_head_min_bytes,
            },
            "memory": {
                "ram_bytes": self.memory.ram_bytes,
                "weights_placement": self.memory.weights_placement.value,
                "alignment": self.memory.alignment,
                "external_data_threshold": self.memory.external_data_threshold,
                "fold_max_bytes": self.memory.fold_max_bytes,
            },
        }


def _int4_scheme(value, source: str) -> Int4Scheme:
    try:
        return Int4Scheme(str(value))
    except ValueError:
        raise TargetError(f"{source}: tuning.int4_scheme must be one of "
                          f"{', '.join(s.value for s in Int4Scheme)}, got {value!r}") from None


def _parse(data: dict, source: str) -> Target:
    try:
        isa, tuning, memory = data["isa"], data["tuning"], data["memory"]
        alignment = int(memory["alignment"])
        if alignment <= 0 or alignment & (alignment - 1):
            raise TargetError(f"{source}: memory.alignment must be a power of two, got {alignment}")
        preferred = str(tuning.get("preferred_quantization", "int8"))
        if preferred not in QUANTIZATIONS:
            raise TargetError(f"{source}: tuning.preferred_quantization must be one of {', '.join(QUANTIZATIONS)}, "
                              f"got {preferred!r}")
        block = int(tuning.get("int4_block_size", 32))
        gptq_block = int(tuning.get("int4_block_size_gptq", block))
        for key, value in (("int4_block_size", block), ("int4_block_size_gptq", gptq_block)):
            if value not in INT4_BLOCK_SIZES:
                raise TargetError(f"{source}: tuning.{key} must be a power of two from 16 to 256, got {value}")
        return Target(
            name=str(data["name"]),
            description=str(data.get("description", "")),
            isa=Isa(arch=str(isa["arch"]), features=frozenset(isa.get("features", [])),
                    emulator_cpu=str(isa.get("emulator_cpu", ""))),
            tuning=Tuning(
                runtime=str(tuning["runtime"]),
                runtime_version=str(tuning["runtime_version"]),
                max_opset=int(tuning["max_opset"]),
                allowed_domains=frozenset(tuning.get("allowed_domains", [""])),
                fused_ops=frozenset(tuning.get("fused_ops", [])),
                preferred_quantization=preferred,
                int4_block_size=block,
                int4_block_size_gptq=gptq_block,
                int4_scheme=_int4_scheme(tuning.get("int4_scheme", Int4Scheme.ASYMMETRIC.value), source),
                nbits_accuracy_level=int(tuning.get("nbits_accuracy_level", 0)),
                greedy_head_min_bytes=int(tuning.get("greedy_head_min_bytes", 0)),
            ),
            memory=MemoryMode(
                ram_bytes=int(memory["ram_bytes"]),
                weights_placement=WeightsPlacement(memory["weights_placement"]),
                alignment=alignment,
                external_data_threshold=int(memory.get("external_data_threshold", 1024)),
                fold_max_bytes=int(memory.get("fold_max_bytes", 1 << 22)),
            ),
            source=source,
            runtime=RuntimeModel.from_table(data.get("runtime")),
        )
    except KeyError as exc:
        raise TargetError(f"{source}: missing key {exc}") from exc
    except ValueError as exc:
        raise TargetError(f"{source}: {exc}") from exc


def _builtin_files() -> dict[str, Path]:
    folder = resources.files("lmc.targets")
    files = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".toml"):
            files[entry.name[:-5]] = Path(str(entry))
    return files


def available_targets() -> list[Target]:
    """All built-in targets, sorted by name."""
    return sorted((load_target(str(p)) for p in _builtin_files().values()), key=lambda t: t.name)


def load_target(name_or_path: str) -> Target:
    """Resolve a target name (``cortex-a55``) or a path to a target TOML file."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") and path.is_file():
        source = str(path)
    else:
        files = _builtin_files()
        key = name_or_path.replace("-", "_")
        if key not in files:
            names = sorted(f.replace("_", "-") for f in files)
            raise TargetError(f"unknown target '{name_or_path}'; known targets: {', '.join(names)}")
        path, source = files[key], f"{name_or_path} ({files[key].name})"
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TargetError(f"{source}: cannot read target description ({exc})") from exc
    return _parse(data, source)
