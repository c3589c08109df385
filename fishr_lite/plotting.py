"""One figure style for the whole book: a colour-blind-safe palette, labelled axes, tidy defaults.

Use ``set_style()`` once per chapter; pick colours by role from :data:`ALGORITHM_COLORS` or
:data:`DOMAIN_COLORS` so that ERM, Fishr, ... look the same in every figure.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib as mpl
import matplotlib.pyplot as plt

#: Okabe & Ito's colour-blind-safe palette (Okabe and Ito, 2008).
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]

ALGORITHM_COLORS = {
    "erm": PALETTE[7], "irm": PALETTE[1], "vrex": PALETTE[2], "fishr": PALETTE[0],
    "fishr-notcentered": PALETTE[5], "fishr-fullcov": PALETTE[4], "iga": PALETTE[3],
    "coral": PALETTE[6], "fish": PALETTE[5], "andmask": PALETTE[6],
}
DOMAIN_COLORS = PALETTE[:4]


def set_style() -> None:
    """Apply the book's matplotlib style (call once at the top of a chapter). In a notebook,
    figures are also drawn at twice the pixel density (retina PNG), sharp on HiDPI screens and
    in the PDF."""
    _retina_in_notebooks()
    mpl.rcParams.update({
        "figure.figsize": (6.4, 3.6),
        "figure.dpi": 100,
        "savefig.dpi": 150,
        "axes.prop_cycle": mpl.cycler(color=PALETTE),
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "font.size": 10,
        "legend.frameon": False,
    })


def _retina_in_notebooks() -> None:
    try:
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:  # plain Python: nothing is drawn inline
        return
    if get_ipython() is not None:
        set_matplotlib_formats("retina")


def color_image(image: "torch.Tensor | numpy.ndarray") -> "numpy.ndarray":  # noqa: F821
    """Turn a (2, H, W) red/green Colored MNIST image into an (H, W, 3) RGB array in [0, 1]."""
    import numpy as np

    image = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
    rgb = np.zeros(image.shape[1:] + (3,), dtype=np.float32)
    rgb[..., 0], rgb[..., 1] = image[0], image[1]
    return rgb


def show_grid(images: Sequence["torch.Tensor"], titles: Sequence[str] | None = None, ncols: int = 8,
              scale: float = 0.9) -> "matplotlib.figure.Figure":
    """Show (2, H, W) Colored MNIST images in a grid, without axes."""
    n = len(images)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * scale, nrows * scale), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(color_image(images[k]), interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[k], fontsize=8)
    return fig
