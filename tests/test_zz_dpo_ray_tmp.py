# TEMPORARY (helper's manual check, deleted after): dpo on the two-node cluster
import subprocess, sys
from pathlib import Path
from test_multinode import code, ray_cluster, fine_tuning  # noqa: F401
from finetune.config import load_config
from stages import sft


def test_dpo_on_ray(tiny_project, code, ray_cluster):
    def on_ray(params):
        fine_tuning(params)
        params["dpo"]["trainer"].update(max_steps=4, save_steps=2)
        params["distributed"].update(processes=2, engine="ray")
        params["distributed"]["ray"].update(address=ray_cluster.address, gpus_per_worker=0)
    path = tiny_project.variant("dpo_ray", on_ray)
    cfg = load_config(path)
    # the SFT adapter, one process
    import dataclasses, yaml
    one = yaml.safe_load(path.read_text()); one["distributed"]["engine"] = "accelerate"; one["distributed"]["processes"] = 1
    one_path = tiny_project.root / "dpo_ray_one.yaml"; one_path.write_text(yaml.safe_dump(one))
    import os
    os.chdir(tiny_project.root)
    sft.main(str(one_path))
    run = subprocess.run([sys.executable, "-m", "stages.dpo", str(path)], cwd=tiny_project.root, env=code, capture_output=True, text=True)
    out = run.stdout + run.stderr
    print("\n".join(l for l in out.splitlines() if "'loss'" in l or "dpo:" in l or "error" in l.lower())[-4000:])
    assert run.returncode == 0, out[-5000:]
    assert (Path(cfg.paths.dpo_adapter) / "adapter_model.safetensors").is_file()
    print(sorted(p.name for p in Path(cfg.paths.dpo_metrics).rglob("*")))
