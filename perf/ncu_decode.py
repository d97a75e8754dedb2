"""Drive one decode split kernel launch per config for ncu."""
import sys

import torch

from exp3 import run

B, ctx, ns, bn, w, st = (int(x) for x in sys.argv[1:7])
torch.cuda.synchronize()
print(run(B, ctx, ns, bn, w, st, True))
