"""Does the low-rank regularizer add to the trained-ladder recipe at small budgets? (issue 13, point 4)

    python tools/ladder_regularizer_digits.py 32 10 6    # width, dense epochs, recipe epochs

The digits residual CNN of the demo (width 32), trained as the demo trains it with the regularizer at
strength 0 and 2e-4, converted and trained with nested truncation, baked from the trained factors
(float32), loaded at shares of the factorizable bytes; accuracy on the 360 held-out digits.
"""
import inspect
import json
import sys
import tempfile
import time

import torch
torch.set_num_threads(1)
from stn_edge.host.demo import DigitsResNet, load_digits, train as demo_train
from stn_edge.host.ladder_training import ladder_model, NestedTruncation, bake_trained
from stn_edge.device import Runtime
from stn_edge.host.bake import bake

FLOAT32 = {"precision": "float32"} if "precision" in inspect.signature(bake).parameters else {}
width = int(sys.argv[1]) if len(sys.argv) > 1 else 32
epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 10
ft = int(sys.argv[3]) if len(sys.argv) > 3 else 6
xtr, ytr, xte, yte = load_digits()
cal = torch.from_numpy(xtr[:256])
res = {}
folder = tempfile.mkdtemp(prefix="stn-ladder-reg-")
for strength in (0.0, 2e-4):
    torch.manual_seed(0)
    m = DigitsResNet(width=width)
    demo_train(m, xtr, ytr, epochs=epochs, strength=strength, log=lambda s: None)
    m.eval()
    lad = ladder_model(m, cal[:1], calibration=cal, levels=32, progress=False)
    full = lad.full_bytes; fixed = lad.fixed_bytes
    tr = NestedTruncation(lad, budgets=(0.0, 1.0), samples=2)
    opt = torch.optim.Adam(lad.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, ft * ((len(xtr) + 63) // 64))
    t0 = time.time()
    tr.fit(torch.from_numpy(xtr), torch.from_numpy(ytr), ft, opt, batch_size=64, scheduler=sched, rescore=cal, progress=False)
    lad.eval()
    bake_trained(lad, f"{folder}/reg{strength}.stn", calibration=cal, **FLOAT32)
    out = {}
    for share in (1.0, 0.25, 0.1, 0.05, 0.02):
        b = int(fixed + share * (full - fixed))
        try:
            with Runtime.load(f"{folder}/reg{strength}.stn", mem_limit=f"{100.0 * b / full:.6f}%", backend="numpy", batch_size=len(xte)) as rt:
                out[share] = float((rt.run({"input": xte})["output"].argmax(1) == yte).mean())
        except Exception as e:
            out[share] = f"infeasible ({type(e).__name__})"
    res[strength] = out
    print(strength, "smallest share", (lad.smallest_bytes - fixed) / (full - fixed), out, f"{time.time()-t0:.0f}s", flush=True)
print(json.dumps(res))
