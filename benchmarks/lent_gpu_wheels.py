"""Build `.whl/`, the wheels a call to the lent GPU machine carries (nothing can be downloaded there).

    python3 benchmarks/lent_gpu_wheels.py [--out .whl] [--no-unsloth]

What the stages and benchmarks import that the machine's image lacks or has off-pin, for Python 3.12 on
manylinux; antlr4's sdist is built here; bitsandbytes and Unsloth are repacked without the parts training never
loads, to fit the 64 MiB a call carries. `benchmarks/lent_gpu_setup.sh` installs the folder there.
"""

import argparse
import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

PROJECT_WHEELS = [
    "transformers==5.23.0", "peft==0.21.2", "trl==1.16.0", "bitsandbytes==0.50.2", "datasets==5.2.0",
    "tokenizers==0.23.3", "dill==0.4.1", "multiprocess==0.70.19", "ruamel.yaml==0.19.1", "dvclive==3.49.1",
    "dvc==3.67.1", "dvc-data==3.18.3", "dvc-http==2.32.0", "dvc-objects==5.2.0", "dvc-render==1.0.2",
    "dvc-studio-client==0.23.0", "funcy==2.1", "scmrepo==3.6.2", "dulwich==1.2.21", "diskcache==5.6.3",
    "dpath==2.2.0", "flatten-dict==0.5.0", "flufl.lock==9.2.0", "atpublic==9.0.0", "pygtrie==2.6.2",
    "sqltrie==0.11.3", "voluptuous==0.16.0", "zc.lockfile==4.0", "platformdirs==4.14.7", "configobj==5.0.9",
    "hydra-core==1.3.8", "omegaconf==2.3.1", "liger-kernel==0.8.5",
]  # fmt: skip
SDIST_ONLY = ["antlr4-python3-runtime==4.9.3"]
UNSLOTH_PINS = Path(__file__).with_name("unsloth_requirements.txt")  # what benchmarks/unsloth_site.sh installs
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"] + [
    arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64")
    for arg in ("--platform", tag)
]  # fmt: skip
BITSANDBYTES_LIBRARIES_KEPT = ("_cuda130.so", "_cuda132.so", "_cpu.so")  # the image's CUDA 13.0 and the CPU


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "-q", "--no-deps"], check=True)


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def repack(wheel: Path, drop) -> None:
    """Rewrite `wheel` without the members `drop(name)` selects, its RECORD listing what stays."""
    kept = {}
    with zipfile.ZipFile(wheel) as source:
        for info in source.infolist():
            if not drop(info.filename):
                kept[info.filename] = source.read(info)
    record_name = next(name for name in kept if name.endswith(".dist-info/RECORD"))
    lines = [record_line(name, data) for name, data in kept.items() if name != record_name]
    kept[record_name] = ("\n".join(lines + [f"{record_name},,"]) + "\n").encode()
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as target:
        for name, data in kept.items():
            target.writestr(name, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(".whl"))
    parser.add_argument("--no-unsloth", action="store_true", help="skip .whl/unsloth (peers.py's Unsloth runs)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pip("download", *PLATFORM, "-d", str(args.out), *PROJECT_WHEELS)
    pip("wheel", "-w", str(args.out), *SDIST_ONLY)
    for wheel in args.out.glob("bitsandbytes-*.whl"):
        repack(wheel, lambda name: "libbitsandbytes_" in name and not name.endswith(BITSANDBYTES_LIBRARIES_KEPT))
    if not args.no_unsloth:
        unsloth = args.out / "unsloth"
        pip("download", *PLATFORM, "-d", str(unsloth), "-r", str(UNSLOTH_PINS))
        for wheel in unsloth.glob("unsloth-*.whl"):
            repack(wheel, lambda name: name.startswith("studio/"))  # its web app, never imported by training
    total = sum(path.stat().st_size for path in args.out.rglob("*.whl"))
    print(f"{args.out}: {total / 2**20:.1f} MiB of wheels (a call carries at most 64 MiB)")


if __name__ == "__main__":
    main()
