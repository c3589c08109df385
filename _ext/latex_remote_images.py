"""PDF: a remote image that LaTeX cannot include (the Colab badge of each chapter's first cell,
an SVG) becomes its alt text, so that the link stays ("Open In Colab") and xelatex does not stop
at the SVG that Sphinx would download. The HTML keeps the image."""

from __future__ import annotations

from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.transforms.post_transforms import SphinxPostTransform

LATEX_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf")


class RemoteImagesAsText(SphinxPostTransform):
    builders = ("latex",)
    default_priority = 90  # before Sphinx's ImageDownloader (100) fetches them

    def run(self, **kwargs: Any) -> None:
        for image in list(self.document.findall(nodes.image)):
            uri = image["uri"]
            if "://" not in uri or uri.split("?")[0].lower().endswith(LATEX_IMAGE_SUFFIXES):
                continue
            alt = image.get("alt", "")
            if isinstance(image.parent, nodes.TextElement):
                image.replace_self(nodes.Text(alt))
            else:
                image.replace_self(nodes.paragraph("", alt))


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_post_transform(RemoteImagesAsText)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
