"""`flash`: the paper's method. Per layer and token:

  1. a wanted-set source (llmflash.sparsity: the oracle, all neurons, or the calibrated
     predictors) names the neurons the token needs, from the layer's FFN input;
  2. the layer's NeuronCache (Rust) evicts neurons not wanted in the last `window` tokens,
     plans the missing bundles into few large direct-I/O reads (coalescing and bridging by the
     disk profile) and starts them into the rows the evictions emptied, then after the live
     rows; holes left over are closed by moving the last live row in, so the live rows stay one
     block (`fill_holes=False`: the paper's scheme, every hole closed by a move before the reads
     start and new neurons appended);
  3. while those reads are in flight, the FFN runs on the live rows the fill does not write
     (the admission's filled_rows); then on the rows just read; neurons beyond the layer's
     capacity stream through one shared scratch area in chunks, the first chunk's read started
     on a worker thread as soon as the admission names it (NeuronCache.overflow_reader), so it
     runs beside the fill and the compute on cached and pinned rows rather than after them (with
     overlap=False, flash-serial, after them).

Lookahead: a source with `ahead(layer, x)` (layer+1's neurons from layer's FFN input) gets
layer+1's reads started while layer computes. Unless the source says its `ahead` is final
(`ahead_exact`), layer+1 then asks the source itself and reads what the guess missed before
computing (`lookahead=True` or "layer" wraps any source in sparsity.NextLayerGuess: the layer+1
rule applied to layer's input). A guess is recorded as wanted by the token before
(NeuronCache.begin_guess), so its wrong neurons yield to the true set for capacity and leave with
the window; with compute="wanted" the result does not depend on the guess, with "live" its rows
are computed like any window-kept row. lookahead="attention": the transformer calls
`early(layer, ffn_norm(h))` with the residual h entering the layer, before its attention; the
source's `early` (or sparsity.SameLayerGuess: its own rule on that input) guesses the layer's
set, whose reads then overlap the attention, and the FFN checks the guess as above.

A sticky source (`sticky = True`, `select(layer, x, cached)`: predictors with a stay recall)
names the set knowing which neurons the layer's cache holds: hysteresis, so a cached neuron
stays while its score clears a lower bar and only new neurons must clear the higher one. It sees
the cache as it was before a lookahead guess was admitted; but a wrong guess kept by the window
(or one that took a slot) changes later tokens' caches, so with a sticky source the result of
lookahead can differ from that of no lookahead, unlike with a plain source.

OPT's fc1 bias is resident (Store.up_biases, store order), not in the bundles: each row's bias is
gathered by the row's store position, from the cache's row -> position map for cache rows and
from the overflow ids for scratch rows.

By default (compute="live") the FFN runs on every live row, which is the wanted set plus neurons
kept by the window: for ReLU models the extra rows are exactly what dense would compute for them
(and catch the predictor's misses that happen to be cached); for SwiGLU models they make the
result closer to dense, at no I/O cost. compute="wanted" runs on this token's wanted rows only
(picked in place from the live block by the native kernel for float16 decode; gathered
otherwise): the sparse product the predictor names, at less than half the memory traffic when
the window keeps twice the wanted set (the paper's OPT regime). With every neuron wanted, flash
equals dense either way.

Modules: options.py (FlashOptions, checked), setup.py (source, layers, memory plan, reader,
caches), layer.py (one layer's state), ffn.py (FlashFFN, the per-token steps), overflow.py (the
thread that reads overflow beside the fill).
"""

from .ffn import FlashFFN
from .options import MAX_WINDOW, FlashOptions, check_window
from .setup import model_bytes

__all__ = ["MAX_WINDOW", "FlashFFN", "FlashOptions", "check_window", "model_bytes"]
