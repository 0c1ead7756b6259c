"""EDM-compatible core: networks, preconditioners, a safe loader for EDM's pickles, and EDM's sampler."""
