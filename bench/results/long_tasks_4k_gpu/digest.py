"""Digest of a safetensors checkpoint's tensors (names, dtypes, shapes, bytes), for comparing conversions."""
import hashlib, sys
from safetensors import safe_open
h = hashlib.sha256()
with safe_open(sys.argv[1], "pt") as f:
    for k in sorted(f.keys()):
        t = f.get_tensor(k).contiguous()
        h.update(k.encode()); h.update(str(t.dtype).encode()); h.update(str(tuple(t.shape)).encode())
        h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes())
print(h.hexdigest())
