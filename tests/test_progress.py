"""The job's progress bar: image shares from split shifts add up to the total, never past it."""

from __future__ import annotations

import warnings

from pipeline.extraction.progress import JobProgress


def test_shares_of_images_end_the_bar_at_its_total():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tqdm warns when it has to clamp a bar past its total
        with JobProgress(3) as progress:
            for _ in range(30):  # ten shares of each image: 0.1 thirty times is 3.0000000000000013
                progress.computed(0.1, views=2)
            assert progress.bar.n == 3
            assert progress.views == 60
            progress.bar.refresh()
