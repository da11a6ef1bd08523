"""Reading order of the boxes on a page (text lines, tables, figures): recursive XY-cut with column bands.

Written here because neither PyMuPDF (`sort=True` sorts by position, which interleaves columns) nor
pymupdf4llm's layout mode (it interleaved two columns at full-width formulas and tables) gets multi-column
pages with full-width elements right. Plain XY-cut fails on such pages the other way round: the lines of two
columns set on one baseline grid leave a horizontal gap between every pair of lines, so a horizontal cut
slices the page into rows that each hold one line of either column. Here a page is first cut into strips at
horizontal gaps, then consecutive strips that share a vertical gutter are joined into one band: the columns
run through the band, a full-width element (it covers the gutter) ends it. Each band is then cut into its
columns, read one after the other, and so on recursively.
"""

from __future__ import annotations

from typing import Sequence

Box = Sequence[float]  # x0, y0, x1, y1

# narrowest gap between two columns; line boxes of one column never have gaps this wide between them
MIN_GUTTER = 8.0


def reading_order(boxes: Sequence[Box], solid: Sequence[bool] | None = None) -> list[int]:
    """Indices of `boxes` in reading order: columns top to bottom, left column first, bands top to bottom.
    `solid` marks boxes that are no text lines (tables, figures): see `_bands`."""
    solid = list(solid) if solid is not None else [False] * len(boxes)
    return _order(list(range(len(boxes))), boxes, solid)


def _order(idx: list[int], boxes, solid) -> list[int]:
    if len(idx) <= 1:
        return idx
    strips = _groups(idx, boxes, axis=1, min_gap=0.0)
    if len(strips) > 1:
        bands = _bands(strips, boxes, solid)
        if len(bands) > 1:
            return [i for band in bands for i in _order(band, boxes, solid)]
    columns = _groups(idx, boxes, axis=0, min_gap=MIN_GUTTER)
    if len(columns) > 1:
        return [i for col in columns for i in _order(col, boxes, solid)]
    if len(strips) > 1:
        return [i for strip in strips for i in _order(strip, boxes, solid)]
    return sorted(idx, key=lambda i: (boxes[i][1], boxes[i][0]))  # boxes overlap both ways


def _groups(idx: list[int], boxes, axis: int, min_gap: float) -> list[list[int]]:
    """The boxes split where a gap wider than min_gap runs between them along the axis (0: x, 1: y)."""
    ordered = sorted(idx, key=lambda i: boxes[i][axis])
    groups, end = [], None
    for i in ordered:
        if end is None or boxes[i][axis] > end + min_gap:
            groups.append([i])
            end = boxes[i][axis + 2]
        else:
            groups[-1].append(i)
            end = max(end, boxes[i][axis + 2])
    return groups


def _has_gutter(idx: list[int], boxes) -> bool:
    return len(_groups(idx, boxes, axis=0, min_gap=MIN_GUTTER)) > 1


def _bands(strips: list[list[int]], boxes, solid) -> list[list[int]]:
    """Consecutive strips joined while the joined boxes still have a vertical gutter between them; a strip
    across the gutter (a heading, a formula, a table) ends the band. A strip on one side of the gutter joins a
    band of text columns (the other column has a gap there), but not a band of only tables or figures side
    by side: a short line under two tables is the text below them, not the end of the left one's column."""
    bands = [list(strips[0])]
    for strip in strips[1:]:
        joined = bands[-1] + strip
        if _has_gutter(joined, boxes) and (_has_gutter(strip, boxes) or not all(solid[i] for i in bands[-1])):
            bands[-1] += strip
        else:
            bands.append(list(strip))
    return bands
