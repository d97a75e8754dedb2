"""exp26 record (falsified; perf/NOTES.md): the Gluon prefill made
persistent -- one program per SM taking work items from a global atomic
counter (heavy-first), its producer publishing each item's record to the
consumers through shared memory and prefetching the next item's Q and first
K/V. Slower than the one-program-per-tile kernel (H100 1x8k 1.09 -> 1.18 ms,
4x2k 0.342 -> 0.351 ms).

Its code is superseded by perf/exp35_persistent_prefill_gluon.py, which
starts from it and finds the per-tile loss (loop bounds read from shared
memory are not provably warp-uniform, so ptxas rebuilt every wgmma
descriptor each tile; redux.sync fixes it); the adopted form is
``diffkv.triton.kernels.prefill_gluon._persistent_kernel``. The original
file, to rerun it:

    git show c0fff50:perf/exp26_persistent_prefill_gluon.py > /tmp/exp26.py
    python perf/exp25.py /tmp/exp26.py product
"""
