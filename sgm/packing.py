"""Packing by hand: weights for the eyes' last PVT stage that move the text's tokens into reading order.

Gemma reads the image's tokens only when they are packed: the text's tokens in order at consecutive image positions,
nothing in between (docs/RESULTS.md, "The demo's eyes", session 12), and it goes on from the image's text only when
that text ends at the image's last position, the positions before it holding a space token's embedding (zeros there
derail it: session 20). So the text is packed right-aligned: of n tokens, the k-th (1-based) at position 49 - n + k.
A tower that recognises what is drawn still has to *count* to pack it, and counting learned by gradient descent was
the wall (sessions 13-14: 30% of the tokens packed after 40,000 maps even from perfect recognition). Counting is
simple arithmetic, so this module sets it by hand: stage 4 of the stock PvtModel (7 x 7 positions and a CLS token,
256 wide, 8 heads of 32, four blocks, MLP ratio 4) gets weights that compute, from a per-cell map of token starts,
each start's place in reading order and the number of starts, then copy each start's code to its output position.
The stages before it (learned) only have to say, for each 16-px cell of the 14 x 14 stage, whether a token starts
there (up to two: `UNITS`) and what token it is (a CODE-wide vector); the projector (learned) turns a code into
Gemma's embedding, and the zero code, what the positions before the text get, into the filler's (tools/eyes.py).
Nothing here is trained, nothing is stored in the eyes file: `put_packer` writes the same weights every time, and
the tower stays a stock PvtModel that any transformers install loads.

How, in the stock blocks (pre-LayerNorm attention and a GELU MLP; all exact on integer counts):
- The residual stream holds constants +-BIG from the position embedding (and +-PATCH_BIG in the patch embedding),
  so every LayerNorm divides by the same sigma (to ~1e-6), and every write also writes minus its sum into a
  balancing channel, so no LayerNorm subtracts a mean: the blocks are linear where they need to be, and a code
  leaves the stage as it came in.
- Block 0 (MLP): each unit's start logit -> a clean 0/1 flag (a steep difference of two GELUs).
- Block 1 (attention): the starts in each row of 16-px cells up to and including this position. A softmax over a
  set of fixed size averages with a known denominator: the query attends to the positions of its row at or left of
  it and to as many always-blank positions of the bottom row as make the set 7 large, so the average is the
  count / 7. A second head, with no query or key, averages every position's starts: n / 50. The MLP writes K^2,
  K = k + 1 - (49 - n) being the place in reading order that output position k (0-based) wants.
- Block 2 (attention, then MLP): the starts on all earlier rows (the same trick over the rows' last positions), so
  each unit knows c, its 1-based place in reading order; the MLP writes c^2 (c + 2 sum_t relu(c - t), exact for
  integers, GELU at a steep scale standing in for relu).
- Block 3 (attention, one head per unit): output position k scores each unit by lambda (2 K c - c^2) (the
  largest where c = K) plus a large bonus for a real start, against the CLS token as a sink scored half a step
  lower; the winner's code is copied. Before the text (K < 1) the sink wins and the code is zero. A text of more
  than 49 starts keeps its last 49; the squares are exact up to 128 starts (SQUARES), beyond which the sink wins
  everywhere (the image reads as the filler alone).
The bottom row of 7 x 7 positions (the image's last 32 px) must be blank: the benchmark's layout leaves it so
for texts of up to eight lines. The arithmetic needs float32 (the counts are compared to a part in 10^4);
`check_precision` refuses anything else.
"""
import math

import torch

GRID = 7            # stage 4 is GRID x GRID positions (and CLS); each covers 2 x 2 cells of the 14 x 14 stage
UNITS = 8           # token starts a position can hold: 2 x 2 cells, up to 2 starts (first, second) in each
CODE = 20           # the width of a token's code
STAGE3_WIDTH = 160  # stage 3's hidden size: the packer reads FLAG_IN and CODE_IN of its last block's output
FLAG_IN = (0, 1)    # stage-3 channels: the logit that a first / second token starts in this 16-px cell
CODE_IN = (2, 2 + CODE)  # stage-3 channels: the first start's code, then the second's
WIDTH, HEAD = 256, 32
BIG = 1.0e4         # the constant channels' size: keeps every LayerNorm's sigma fixed
PATCH_BIG = 1000.0  # the same in the patch embedding's LayerNorm, so that it passes the codes on linearly
CONST = BIG + math.sqrt(WIDTH / 2)  # the constant channels in the residual: BIG plus the LayerNorm'd PATCH_BIG
SCORE = 100.0       # attention margin (logits) between a set member and a non-member
LAMBDA = 40.0       # selection: logits a count off by one loses (the sink sits half of it below the winner)
STEEP = 1.0e5       # the flag's step: a start logit of +-0.005 in stage 3 is already a clean 1 or 0
RELU_SCALE = 10.0   # gelu(10 x) / 10 = relu(x) on integers to 1e-20
MLP_RATIO = 4
MLP = MLP_RATIO * WIDTH  # each block's MLP units
SQUARES = 128       # c^2 is exact up to c = 128 (UNITS x SQUARES = MLP units)

# The stage-4 residual's channels.
ZERO, BIG_PLUS, BIG_MINUS, IS_CLS, SLOT, WANT_SQ = 0, 1, 2, 3, 4, 5  # WANT_SQ: (the place wanted here)^2
ROW, COL, ROW_KEY, PREV_KEY = 6, 6 + GRID, 6 + 2 * GRID, 6 + 3 * GRID  # one-hots and per-position key features
FLAG_POS, FLAG_NEG = 34, 34 + UNITS   # a unit's start logit as + and - copies (LayerNorm's mean cancels in the sum)
FLAG = 34 + 2 * UNITS                 # the clean 0/1 flag
SQUARE = 34 + 3 * UNITS               # c^2 / SQUARE_UNIT
PREFIX = 34 + 4 * UNITS               # 2 channels: starts in this row of cells (top, bottom) up to here, / 7
ABOVE, ROW_TOP = PREFIX + 2, PREFIX + 3  # starts in all earlier rows / 42; the top cell-row's total / 7
BALANCE = PREFIX + 4                  # minus the sum of every other channel: each position's mean is 0
OUT = PREFIX + 5                      # CODE channels: the packed token's code (the projector reads these)
CODES = OUT + CODE                    # UNITS x CODE channels: each unit's code
TOTAL = CODES + UNITS * CODE          # the text's number of starts / 50 (every position's own copy)
SQUARE_UNIT = 2500.0
WANT_MAX = SQUARES  # (the place wanted)^2 is exact for places -WANT_MAX..WANT_MAX
assert UNITS * SQUARES <= MLP and 2 * (WANT_MAX + 1) <= MLP  # block 2's and block 1's MLP units
assert TOTAL < WIDTH


def contract():
    """What the learned parts and the packer agree on, and nothing else: the stage-3 channels the packer reads (each
    cell's start logits and codes), the geometry, and the output channels the projector reads. Eyes are trained
    against this (training never passes through the packer), so they fit any packer with the same contract."""
    return dict(stage3_width=STAGE3_WIDTH, flag_in=list(FLAG_IN), code_in=list(CODE_IN), code=CODE, grid=GRID,
                units=UNITS, width=WIDTH, out=OUT)


def unit(t, u, s):
    """Unit index of the s-th start (0: first, 1: second) in cell (row t, column u) of a position's 2 x 2 cells:
    reading order within a row of cells."""
    return 4 * t + 2 * u + s


def config_fits(config):
    """A one-line reason the PvtConfig cannot hold the packer, or None."""
    want = dict(hidden_sizes=WIDTH, num_attention_heads=WIDTH // HEAD, depths=4, mlp_ratios=MLP_RATIO)
    for name, value in want.items():
        if getattr(config, name)[-1] != value:
            return f"stage 4 needs {name} {value}, the config has {getattr(config, name)[-1]}"
    if config.hidden_sizes[-2] != STAGE3_WIDTH or config.image_size // 32 != GRID:
        return f"the packer reads a {STAGE3_WIDTH}-wide 14 x 14 stage 3 and writes {GRID} x {GRID}"
    return None


class _Reads:
    """Linear reads of the LayerNorm'd residual: read(channel, a) adds a * x[channel] to an output row. LayerNorm
    (weight 1, bias 0) gives (x - mean) / sigma: the mean is 0 (BALANCE; reading against ZERO would cancel it
    anyway) and sigma is fixed to ~1e-6 by the constant channels, BIG from the position embedding plus the patch
    embedding's own constant after its LayerNorm, sqrt(WIDTH / 2)."""
    sigma = CONST * math.sqrt(2 / WIDTH)

    def __init__(self, rows):
        self.weight = torch.zeros(rows, WIDTH, dtype=torch.float64)

    def read(self, row, channel, a):
        self.weight[row, channel] += a * self.sigma
        self.weight[row, ZERO] -= a * self.sigma


def _count_reads(reads, row, h, a=1.0):
    """Add a * c to `row`: c, the 1-based place in reading order of unit h's start (meaningful where it is one):
    42 * ABOVE + 7 * ROW_TOP (bottom cell-row only) + 7 * PREFIX of its cell-row, less the starts after it in its
    own position's part of that cell-row."""
    t, rest = divmod(h, 4)
    reads.read(row, ABOVE, 42 * a)
    if t == 1:
        reads.read(row, ROW_TOP, 7 * a)
    reads.read(row, PREFIX + t, 7 * a)
    for later in range(rest + 1, 4):
        reads.read(row, FLAG + 4 * t + later, -a)


def packer_weights(config):
    """{state-dict name (under the PvtModel): tensor} for stage 4's patch embedding, its four blocks and the final
    LayerNorm. Deterministic; float32."""
    why = config_fits(config)
    if why:
        raise ValueError(f"the packer does not fit this tower: {why}")
    f64 = dict(dtype=torch.float64)
    w = {}
    pe, blocks = "encoder.patch_embeddings.3.", "encoder.block.3."

    # Patch embedding: route each cell's flags and codes into its position's units; no bias.
    conv = torch.zeros(WIDTH, STAGE3_WIDTH, 2, 2, **f64)
    for t in range(2):
        for u in range(2):
            for s in range(2):
                h = unit(t, u, s)
                conv[FLAG_POS + h, FLAG_IN[s], t, u] = 1.0
                conv[FLAG_NEG + h, FLAG_IN[s], t, u] = -1.0
                for i in range(CODE):
                    conv[CODES + h * CODE + i, CODE_IN[0] + s * CODE + i, t, u] = 1.0
    conv_bias = torch.zeros(WIDTH, **f64)
    conv_bias[BIG_PLUS], conv_bias[BIG_MINUS] = PATCH_BIG, -PATCH_BIG
    w[pe + "projection.weight"], w[pe + "projection.bias"] = conv, conv_bias
    w[pe + "layer_norm.weight"], w[pe + "layer_norm.bias"] = torch.ones(WIDTH, **f64), torch.zeros(WIDTH, **f64)

    # Position embedding (CLS first) and the CLS token itself.
    pos = torch.zeros(1 + GRID * GRID, WIDTH, **f64)
    pos[:, BIG_PLUS], pos[:, BIG_MINUS] = BIG, -BIG
    pos[0, IS_CLS] = 1.0
    for r in range(GRID):
        for c in range(GRID):
            p, k = 1 + GRID * r + c, GRID * r + c
            pos[p, ROW + r], pos[p, COL + c] = 1.0, 1.0
            pos[p, SLOT] = (k + 1) / 49
            for q in range(GRID):  # the row count's key: left of (or at) column q; the blank bottom row pads
                pos[p, ROW_KEY + q] = float(c > q) if r == GRID - 1 else float(c <= q)
                # the earlier rows' key: the last column of a row above query row q; bottom-row pads
                last_col = float(c == GRID - 1 and r < q)
                pad = float(r == GRID - 1 and q <= c <= GRID - 2)
                pos[p, PREV_KEY + q] = last_col + pad
    w[pe + "position_embeddings"] = pos[None]
    cls = torch.zeros(1, 1, WIDTH, **f64)
    cls[0, 0, FLAG_NEG:FLAG_NEG + UNITS] = 1.0  # the CLS token holds no start
    cls[0, 0, BIG_PLUS], cls[0, 0, BIG_MINUS] = math.sqrt(WIDTH / 2), -math.sqrt(WIDTH / 2)  # as LayerNorm'd
    w[pe + "cls_token"] = cls

    def empty_block(j):
        names = {"layer_norm_1.weight": torch.ones(WIDTH), "layer_norm_1.bias": torch.zeros(WIDTH),
                 "layer_norm_2.weight": torch.ones(WIDTH), "layer_norm_2.bias": torch.zeros(WIDTH)}
        for part in ("query", "key", "value"):
            names[f"attention.self.{part}.weight"] = torch.zeros(WIDTH, WIDTH)
            names[f"attention.self.{part}.bias"] = torch.zeros(WIDTH)
        names["attention.output.dense.weight"] = torch.zeros(WIDTH, WIDTH)
        names["attention.output.dense.bias"] = torch.zeros(WIDTH)
        names["mlp.dense1.weight"], names["mlp.dense1.bias"] = torch.zeros(MLP, WIDTH), torch.zeros(MLP)
        names["mlp.dense2.weight"], names["mlp.dense2.bias"] = torch.zeros(WIDTH, MLP), torch.zeros(WIDTH)
        return {f"{blocks}{j}.{k}": v.to(torch.float64) for k, v in names.items()}

    scale = math.sqrt(HEAD)  # PVT divides the scores by sqrt(head size)

    # Block 0 (MLP): the clean flag of each unit: (gelu(s z + 4) - gelu(s z - 4)) / 8, z = the start logit.
    w.update(empty_block(0))
    up = _Reads(MLP)
    bias = torch.zeros(MLP, **f64)
    down = torch.zeros(WIDTH, MLP, **f64)
    for h in range(UNITS):
        for j, shift in ((2 * h, 4.0), (2 * h + 1, -4.0)):
            up.read(j, FLAG_POS + h, STEEP)
            up.read(j, FLAG_NEG + h, -STEEP)
            bias[j] = shift
            down[FLAG + h, j] = 1 / 8 if shift > 0 else -1 / 8
    w[f"{blocks}0.mlp.dense1.weight"], w[f"{blocks}0.mlp.dense1.bias"] = up.weight, bias
    w[f"{blocks}0.mlp.dense2.weight"] = down

    # Block 1 (attention, head 0): starts up to here in each of the position's two rows of cells, / 7.
    w.update(empty_block(1))
    q, k, v = _Reads(WIDTH), _Reads(WIDTH), _Reads(WIDTH)
    for r in range(GRID):
        q.read(r, ROW + r, SCORE * scale)             # same row ...
        q.read(GRID + r, COL + r, SCORE * scale)      # ... and the column's key feature
        for key_row in range(GRID):                   # the bottom row matches every query row: it pads
            if key_row == r or key_row == GRID - 1:
                k.read(r, ROW + key_row, 1.0)
        k.read(GRID + r, ROW_KEY + r, 1.0)
    q.read(GRID - 1, IS_CLS, 2 * SCORE * scale)       # CLS averages the blank bottom row: zeros
    for t in range(2):
        for rest in range(4):
            v.read(t, FLAG + 4 * t + rest, 1.0)
    for h in range(UNITS):  # head 1: no query or key, so every position averages all 50 (CLS's flags are 0)
        v.read(HEAD, FLAG + h, 1.0)
    out = torch.zeros(WIDTH, WIDTH, **f64)
    out[PREFIX, 0], out[PREFIX + 1, 1] = 1.0, 1.0
    out[TOTAL, HEAD] = 1.0
    a = f"{blocks}1.attention."
    w[a + "self.query.weight"], w[a + "self.key.weight"], w[a + "self.value.weight"] = q.weight, k.weight, v.weight
    w[a + "output.dense.weight"] = out
    # Block 1's MLP: K^2, K = k + 1 - (49 - n) being the place in reading order that image position k wants (the
    # text right-aligned: its last token at the last position), n = 50 TOTAL; K^2 = f(K) + f(-K), f(m) = relu(m) +
    # 2 sum_{t >= 1} relu(m - t) (0 for m <= 0), exact on integers.
    up = _Reads(MLP)
    bias = torch.zeros(MLP, **f64)
    down = torch.zeros(WIDTH, MLP, **f64)
    for side, sign in enumerate((1.0, -1.0)):
        for t in range(WANT_MAX + 1):
            j = side * (WANT_MAX + 1) + t
            up.read(j, SLOT, sign * 49 * RELU_SCALE)
            up.read(j, BIG_PLUS, -sign * 49 * RELU_SCALE / CONST)
            up.read(j, TOTAL, sign * 50 * RELU_SCALE)
            bias[j] = -RELU_SCALE * t
            down[WANT_SQ, j] = (1.0 if t == 0 else 2.0) / RELU_SCALE / SQUARE_UNIT
    w[f"{blocks}1.mlp.dense1.weight"], w[f"{blocks}1.mlp.dense1.bias"] = up.weight, bias
    w[f"{blocks}1.mlp.dense2.weight"] = down

    # Block 2 (attention): head 0, the starts of all earlier rows / 42 (6 members: rows above, bottom-row pads);
    # head 1, this row's top cell-row total / 7 (its last position's PREFIX). MLP: c^2 of each unit.
    w.update(empty_block(2))
    q, k, v = _Reads(WIDTH), _Reads(WIDTH), _Reads(WIDTH)
    out = torch.zeros(WIDTH, WIDTH, **f64)
    for r in range(GRID):
        q.read(r, ROW + r, SCORE * scale)
        k.read(r, PREV_KEY + r, 1.0)
    q.read(GRID, IS_CLS, 2 * SCORE * scale)           # CLS reads the blank bottom row's first position: zeros
    k.read(GRID, ROW + GRID - 1, 1.0)
    q.read(GRID + 1, IS_CLS, 2 * SCORE * scale)
    k.read(GRID + 1, COL, 1.0)
    v.read(0, PREFIX, 1.0)
    v.read(0, PREFIX + 1, 1.0)
    out[ABOVE, 0] = 1.0
    o = HEAD
    for r in range(GRID):
        q.read(o + r, ROW + r, SCORE * scale)
        k.read(o + r, ROW + r, 1.0)
    q.read(o + GRID, BIG_PLUS, SCORE * scale / CONST)  # every query wants the last column
    k.read(o + GRID, COL + GRID - 1, 1.0)
    q.read(o + GRID + 1, IS_CLS, 3 * SCORE * scale)  # CLS: the bottom row's first position, blank
    k.read(o + GRID + 1, ROW + GRID - 1, 1.0)
    q.read(o + GRID + 2, IS_CLS, 3 * SCORE * scale)
    k.read(o + GRID + 2, COL, 1.0)
    v.read(o, PREFIX, 1.0)
    out[ROW_TOP, o] = 1.0
    a = f"{blocks}2.attention."
    w[a + "self.query.weight"], w[a + "self.key.weight"], w[a + "self.value.weight"] = q.weight, k.weight, v.weight
    w[a + "output.dense.weight"] = out
    up = _Reads(MLP)
    bias = torch.zeros(MLP, **f64)
    down = torch.zeros(WIDTH, MLP, **f64)
    for h in range(UNITS):
        for t in range(SQUARES):  # c^2 = c + 2 sum_{t >= 1} relu(c - t) for integers 0 <= c <= SQUARES
            j = h * SQUARES + t
            _count_reads(up, j, h, RELU_SCALE)
            bias[j] = -RELU_SCALE * t
            down[SQUARE + h, j] = (1.0 if t == 0 else 2.0) / RELU_SCALE / SQUARE_UNIT
    w[f"{blocks}2.mlp.dense1.weight"], w[f"{blocks}2.mlp.dense1.bias"] = up.weight, bias
    w[f"{blocks}2.mlp.dense2.weight"] = down

    # Block 3 (attention, head h reads unit h): image position k scores lambda (2 K c - c^2) + SCORE * flag, K the
    # place it wants (block 1); the CLS sink scores lambda K^2 - lambda / 2 + SCORE, half a step below the start whose
    # c is K, and above every start where K < 1 (the positions before the text).
    w.update(empty_block(3))
    q, k, v = _Reads(WIDTH), _Reads(WIDTH), _Reads(WIDTH)
    out = torch.zeros(WIDTH, WIDTH, **f64)
    for h in range(UNITS):
        o = h * HEAD
        q.read(o, SLOT, 2 * LAMBDA * 49 * scale)  # 2 lambda K = 2 lambda (49 SLOT - 49 + 50 TOTAL)
        q.read(o, BIG_PLUS, -2 * LAMBDA * 49 * scale / CONST)
        q.read(o, TOTAL, 2 * LAMBDA * 50 * scale)
        _count_reads(k, o, h)
        q.read(o + 1, BIG_PLUS, -LAMBDA * scale / CONST)
        k.read(o + 1, SQUARE + h, SQUARE_UNIT)
        q.read(o + 2, BIG_PLUS, SCORE * scale / CONST)
        k.read(o + 2, FLAG + h, 1.0)
        q.read(o + 3, WANT_SQ, LAMBDA * SQUARE_UNIT * scale)
        q.read(o + 3, BIG_PLUS, (SCORE - LAMBDA / 2) * scale / CONST)
        k.read(o + 3, IS_CLS, 1.0)
        for i in range(CODE):
            v.read(o + i, CODES + h * CODE + i, 1.0)
            out[OUT + i, o + i] = 1.0
    a = f"{blocks}3.attention."
    w[a + "self.query.weight"], w[a + "self.key.weight"], w[a + "self.value.weight"] = q.weight, k.weight, v.weight
    w[a + "output.dense.weight"] = out

    # The tower's last LayerNorm passes the packed code alone, at the scale it had in stage 3.
    norm = torch.zeros(WIDTH, **f64)
    norm[OUT:OUT + CODE] = _Reads.sigma * PATCH_BIG * math.sqrt(2 / WIDTH)
    w["encoder.layer_norm.weight"], w["encoder.layer_norm.bias"] = norm, torch.zeros(WIDTH, **f64)

    # Balance: every write into the residual also writes minus its sum into BALANCE, so each position's mean
    # stays 0 and no LayerNorm here subtracts one.
    w[pe + "position_embeddings"][..., BALANCE] -= w[pe + "position_embeddings"].sum(-1)
    w[pe + "cls_token"][..., BALANCE] -= w[pe + "cls_token"].sum(-1)
    for name in [pe + "projection.weight", pe + "projection.bias"] + [
            f"{blocks}{j}.{part}.{kind}" for j in range(4) for part in ("attention.output.dense", "mlp.dense2")
            for kind in ("weight", "bias")]:
        w[name][BALANCE] -= w[name].sum(0)
    return {name: value.to(torch.float32) for name, value in w.items()}


def put_packer(tower):
    """Write packer_weights into a PvtModel (the eyes' vision tower) in place."""
    state = packer_weights(tower.config)
    missing = [name for name in state if name not in tower.state_dict()]
    if missing:
        raise ValueError(f"the tower has no {missing[0]}: not a PvtModel the packer fits")
    tower.load_state_dict(state, strict=False)
    return tower



def check_precision(dtype):
    """The packer's arithmetic needs float32 (its constants, 1e4, square past float16's range, and it compares
    counts to a part in 1e4); raise in one line otherwise."""
    if dtype != torch.float32:
        raise ValueError(f"the eyes' tower packs tokens by hand-set arithmetic that needs float32, not {dtype}: "
                         "load the demo with --dtype float32")
