"""The parameters layer: how a rank holds a weight (the TE / Megatron protocol, DTensor placements, fused QKV,
pieces, the DP x TP grid) and the moves between holdings."""
