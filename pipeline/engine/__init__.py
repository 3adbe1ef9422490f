"""The SRT engine: shift sets, the exact aggregation, the reference chain, timm ViTs and their taps, device defaults. Pure torch."""
