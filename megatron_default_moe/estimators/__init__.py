"""How a default vector is estimated: the routed rows' EMA (the paper), the probes' mean of the
unchosen output, and the ``shared-1`` line fitted from the probes."""
