"""What the reference formulas need to lay their results out as torch lays out its own (csrc/common/layout.h has the
rules): where an operand repeats one value along a dim (stride 0: an expanded tensor, such as the gradient of a sum),
torch lets the other operands decide where that dim goes in the output's memory. A tensor computed from the operand
alone (t.to(acc), t > 0) is dense, so it would decide instead; computed from one slice along those dims and expanded
back, it repeats as the operand does and leaves the decision where torch leaves it."""


def once(t):
    """t cut to size 1 along each dim over which it repeats: f(once(t)).expand(t.shape) equals f(t) elementwise."""
    return t[tuple(slice(0, 1) if stride == 0 and size > 1 else slice(None)
                   for size, stride in zip(t.shape, t.stride()))]


def widen(t, dtype):
    """t.to(dtype), repeating where t repeats (see once)."""
    return once(t).to(dtype).expand(t.shape)
