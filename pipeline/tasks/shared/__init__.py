"""What more than one task family uses: TokenCut, ground-truth readers, the training loop."""
