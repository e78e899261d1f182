"""FX passes for bitfx (import name ``bitfx.passes``): find RMSNorm -> Linear sites and
rewrite them into ``torch.ops.bitfx.*`` ops."""
