# Sourced by the GPU scripts: record the GPU and the library versions in $out/env.txt and print them.
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  $py -c "import torch, diffusers, peft, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
