"""One PDF page's text layer as Markdown, from PyMuPDF's glyphs (rawdict) and tables (find_tables).

What this adds to PyMuPDF, and why it is written here:
- word spaces from glyph positions: typesetters (TeX, Korean word processors) often write no space
  characters and move the pen instead; MuPDF only adds a space for a gap of about a space's width, so
  Korean text and tightly kerned Latin came out as one long word;
- reading order across columns and full-width elements (reading_order.py);
- sub- and superscripts of a display formula as LaTeX scripts (a smaller glyph off the line's baseline), a
  display broken over lines as one, its printed number "(N)" as `\\tag{N}`;
- tables ruled only across (booktabs, \\hline without vertical bars: most LaTeX tables), which PyMuPDF's
  finder does not find: region from the rules, columns from white space, cells handed to the finder;
- tables without any rule (columns set with tab stops: price lists, statements, schedules): runs of lines
  with white gutters no line crosses, cells wrapped in their column joined, a header spanning columns; told
  apart from two-column pages, justified prose, lists, key: value lines and numbered displays, which have
  that shape too (key: value lines come out one label and value a line, not read as two columns);
- what a page is when it has no usable text: blank, image-only, an invisible OCR layer (render mode 3:
  its text is a guess of an OCR engine), or glyphs without Unicode that the embedded font cannot map back.
"""

from __future__ import annotations

import re
import statistics
import unicodedata
from dataclasses import dataclass, field
from functools import cached_property

import pymupdf

from .reading_order import reading_order

# MuPDF's spaces off (they are rebuilt from positions here, one rule for all), whitespace kept as printed
FLAGS = pymupdf.TEXT_PRESERVE_WHITESPACE | pymupdf.TEXT_MEDIABOX_CLIP | pymupdf.TEXT_INHIBIT_SPACES
# a span drawn neither filled nor stroked is invisible (render mode 3 or 7)
VISIBLE = pymupdf.mupdf.FZ_STEXT_FILLED | pymupdf.mupdf.FZ_STEXT_STROKED
BULLETS = "•◦▪▫●○■□‣⁃∙·–"
# a word space is at least this much wider than the narrow quarter of the line's letter gaps (in em)
WORD_GAP_EM = 0.12
# a gap this wide (in em) inside one MuPDF line is no word space: columns, or cells of a borderless table
SPLIT_GAP_EM = 1.8
# a display's printed number, "(3)" or "(2.1a)"; and what a display's continuation line starts with
EQUATION_NUMBER = re.compile(r"\(\s*(\d+(?:\.\d+)*[a-z]?)\s*\)\s*$")
CONTINUATION = "+-−=<>≤≥×·"
MATH_SIGNS = CONTINUATION + "∑∫√∈≈≠"
# heading levels by size relative to the page's body text
HEADING_RATIOS = ((1.5, 1), (1.2, 2), (1.1, 3))


@dataclass
class Glyph:
    c: str
    x0: float
    y0: float
    x1: float
    y1: float
    size: float
    base: float  # the baseline (origin y)
    bold: bool


@dataclass
class Line:
    glyphs: list[Glyph]
    x0: float = 0.0
    y0: float = 0.0
    x1: float = 0.0
    y1: float = 0.0
    size: float = 0.0
    bold: bool = False

    def __post_init__(self):
        g = self.glyphs
        self.x0, self.y0 = min(x.x0 for x in g), min(x.y0 for x in g)
        self.x1, self.y1 = max(x.x1 for x in g), max(x.y1 for x in g)
        self.size = _dominant([x.size for x in g if not x.c.isspace()] or [g[0].size])
        self.bold = sum(x.bold for x in g) > len(g) / 2

    @property
    def box(self):
        return (self.x0, self.y0, self.x1, self.y1)


@dataclass
class Block:
    kind: str  # text | table | lines (key: value lines, their markdown made) | figure
    box: tuple
    lines: list[Line] = field(default_factory=list)
    markdown: str = ""


@dataclass
class PageText:
    status: str  # labeled | unlabeled
    text: str | None = None
    reason: str | None = None


def _dominant(sizes: list[float]) -> float:
    rounded = [round(s, 1) for s in sizes]
    return max(set(rounded), key=rounded.count)


# ---------------------------------------------------------------- glyphs

def page_glyph_lines(page: pymupdf.Page) -> tuple[list[list[Glyph]], int]:
    """MuPDF's lines as visible glyphs (in their order), and how many glyphs were invisible."""
    raw = page.get_text("rawdict", flags=FLAGS)
    lines, invisible = [], 0
    for block in raw["blocks"]:
        for line in block.get("lines", ()):
            glyphs = []
            for span in line["spans"]:
                if not span.get("char_flags", VISIBLE) & VISIBLE or span.get("alpha", 255) == 0:
                    invisible += len(span["chars"])
                    continue
                bold = bool(span["flags"] & pymupdf.TEXT_FONT_BOLD) or "bold" in span["font"].lower()
                for ch in span["chars"]:
                    x0, y0, x1, y1 = ch["bbox"]
                    glyphs.append(Glyph(ch["c"], x0, y0, x1, y1, span["size"], ch["origin"][1], bold))
            if glyphs:
                lines.append(glyphs)
    return lines, invisible


def unmapped(c: str) -> bool:
    """A character a font gave no Unicode for: U+FFFD, private use, or a control code."""
    o = ord(c)
    return c == "\ufffd" or 0xE000 <= o <= 0xF8FF or o >= 0xF0000 or (o < 32 and c not in "\t\n\r")


def recover_unmapped(page: pymupdf.Page, lines: list[list[Glyph]]) -> None:
    """Glyphs without Unicode (a font without a ToUnicode map) mapped back through the embedded font's own
    cmap, glyph id -> code point, where the font program still has one. MuPDF does not do this itself."""
    todo = {(round(g.x0, 1), round(g.base, 1)): g for line in lines for g in line if unmapped(g.c)}
    if not todo:
        return
    reverse = _reverse_cmaps(page)
    for span in page.get_texttrace():
        cmap = next((m for name, m in reverse.items() if name.startswith(span["font"])), None)
        if not cmap:
            continue
        for ucs, gid, origin, _ in span["chars"]:
            g = todo.get((round(origin[0], 1), round(origin[1], 1)))
            if g is not None and gid in cmap:
                g.c = cmap[gid]


_CMAPS: dict = {}  # (document, font xref) -> glyph id -> character; fonts repeat on every page of a document


def _reverse_cmaps(page: pymupdf.Page) -> dict[str, dict[int, str]]:
    maps = {}
    for xref, ext, _, basefont, *_ in page.get_fonts():
        if ext in ("n/a", ""):
            continue
        key = (page.parent.name, id(page.parent), xref)
        if key not in _CMAPS:
            if len(_CMAPS) > 64:
                _CMAPS.clear()
            _CMAPS[key] = _reverse_cmap(page.parent, xref)
        maps[basefont.split("+", 1)[-1]] = _CMAPS[key]
    return maps


def _reverse_cmap(doc: pymupdf.Document, xref: int) -> dict[int, str]:
    try:
        font = pymupdf.Font(fontbuffer=doc.extract_font(xref)[3])
    except (RuntimeError, ValueError):
        return {}
    reverse = {}
    for cp in font.valid_codepoints():
        reverse.setdefault(font.has_glyph(cp), chr(cp))
    reverse.pop(0, None)
    return reverse


# ---------------------------------------------------------------- words and lines

def split_runs(glyphs: list[Glyph]) -> list[list[Glyph]]:
    """One MuPDF line cut where a gap too wide for a word space runs through it."""
    runs = [[glyphs[0]]]
    for a, b in zip(glyphs, glyphs[1:]):
        if b.x0 - a.x1 > SPLIT_GAP_EM * max(a.size, b.size) or b.x0 < a.x0 - a.size:
            runs.append([b])
        else:
            runs[-1].append(b)
    return runs


def word_threshold(glyphs: list[Glyph], size: float) -> float:
    """Glyph gap above which there is a word space. Letters of a word touch (their boxes are the glyphs'
    advances), give or take kerning and tracking; the narrow quarter of the line's gaps is taken as letter
    spacing, so that tracked (spaced-out) headings do not fall apart into letters."""
    letters = [b.x0 - a.x1 for a, b in zip(glyphs, glyphs[1:]) if not (a.c.isspace() or b.c.isspace())]
    letter_spacing = statistics.quantiles(letters, n=4)[0] if len(letters) >= 4 else 0.0
    return letter_spacing + WORD_GAP_EM * size


def script_kind(g: Glyph, size: float, base: float) -> str:
    if g.size >= 0.85 * size or abs(g.base - base) < 0.12 * size:
        return ""
    return "sup" if g.base < base else "sub"


def line_text(line: Line, latex: bool = False) -> str:
    """The line's characters with word spaces from glyph gaps; with latex, scripts as `^{..}` / `_{..}`."""
    glyphs = line.glyphs
    threshold = word_threshold(glyphs, line.size)
    base = statistics.median(g.base for g in glyphs if round(g.size, 1) == line.size) if latex else 0.0
    out, open_kind = [], ""
    for i, g in enumerate(glyphs):
        if i and not g.c.isspace() and not glyphs[i - 1].c.isspace():
            if g.x0 - glyphs[i - 1].x1 > threshold:
                out.append(" ")
        kind = script_kind(g, line.size, base) if latex else ""
        if kind != open_kind:
            if open_kind:
                out.append("}")
            if kind:
                out.append("^{" if kind == "sup" else "_{")
            open_kind = kind
        out.append(g.c)
    if open_kind:
        out.append("}")
    return re.sub(r"[ \t\u00a0]+", " ", "".join(out)).strip()


def has_scripts(line: Line) -> bool:
    base = statistics.median(g.base for g in line.glyphs if round(g.size, 1) == line.size)
    return any(script_kind(g, line.size, base) for g in line.glyphs if not g.c.isspace())


# ---------------------------------------------------------------- tables

# more vector paths than this on a page is a plot or a drawing, not ruled tables: the finder would take seconds
MAX_TABLE_PATHS = 5000


def page_tables(page: pymupdf.Page, glyph_lines: list[list[Glyph]]) -> list:
    """Ruled tables (PyMuPDF's finder on the page's lines; refine resolves merged cells), then tables ruled
    only across (rule_tables). The layout model is off: it costs ~0.2 s a page and joined two tables printed
    side by side into one."""
    paths = sum(1 for kind, _ in page.get_bboxlog() if kind.endswith("-path"))
    if not paths or paths > MAX_TABLE_PATHS:
        return []
    rules, boxed = drawn_rules(page)
    tables = []
    if boxed:  # with horizontal rules only, the lines finder has no vertical edge to build a cell on
        found = page.find_tables(use_layout=False, refine=True)
        tables = [t for t in found.tables if t.row_count >= 2 and t.col_count >= 2 and t.placements]
    return tables + rule_tables(page, glyph_lines, rules, [tuple(t.bbox) for t in tables])


# ---------------------------------------------------------------- tables ruled only across (LaTeX)
#
# booktabs (\toprule, \midrule, \bottomrule) and \hline without vertical bars draw horizontal rules only,
# and TeX separates a table's columns by white space (2 \tabcolsep), not by aligned word edges. PyMuPDF's
# "lines" finder needs vertical lines; its "text" strategy puts column edges at word edges and centres
# aligned in >= 3 rows, which cuts centred columns and words (`Cavi | ty`) and drops a \multicolumn header.
# So here the region comes from the rules and the columns from the gaps no row's words cross; the cells
# go to PyMuPDF's finder as boxes, which builds the grid, the spans and the placements as for ruled tables.

RULE_MAX_HEIGHT = 1.5  # a rule: a filled rectangle (pdfTeX's \hrule) or a stroke this thin, at least
RULE_MIN_WIDTH = 30.0  # this wide
CELL_GAP_EM = 0.8  # cells of one row are at least this far apart (TeX: 12 pt), words of one cell closer
PROSE_WORDS = 6  # a cell this many words long is a line of prose: table cells are short or wrap


@dataclass
class TextRow:
    top: float
    bottom: float
    segments: list[tuple[float, float, int]]  # x0, x1, words


def drawn_rules(page: pymupdf.Page) -> tuple[list[tuple[float, float, float]], bool]:
    """Thin horizontal rules (x0, y, x1) of the page top to bottom, and whether anything else is drawn
    (vertical rules, boxes, curves: what the cells of a ruled table are made of)."""
    rules, boxed = [], False
    for path in page.get_drawings():
        for item in path["items"]:
            if item[0] not in ("re", "l"):
                boxed = True
                continue
            r = pymupdf.Rect(item[1] if item[0] == "re" else (*item[1], *item[2])).normalize()
            if r.height <= RULE_MAX_HEIGHT and r.width >= RULE_MIN_WIDTH:
                rules.append((r.x0, (r.y0 + r.y1) / 2, r.x1))
            elif r.height > RULE_MAX_HEIGHT:
                boxed = True
    return sorted(rules, key=lambda r: r[1]), boxed


def rule_chains(rules, taken: list[tuple]) -> list[list[tuple]]:
    """Rules of one extent top to bottom (a table's top, middle and bottom rules; shorter \\cmidrules inside
    are no boundaries), outside the tables already found."""
    chains: list[list[tuple]] = []
    for rule in rules:
        if any(b[0] - 2 <= rule[0] and rule[2] <= b[2] + 2 and b[1] - 2 <= rule[1] <= b[3] + 2 for b in taken):
            continue
        chain = next((c for c in chains if abs(c[-1][0] - rule[0]) < 2 and abs(c[-1][2] - rule[2]) < 2), None)
        if chain is None:
            chains.append([rule])
        else:
            chain.append(rule)
    return [c for c in chains if len(c) >= 2]


def table_regions(chains, glyph_lines: list[list[Glyph]]) -> list[tuple]:
    """Boxes from a chain's first rule to its last, cut where a band between two rules holds prose: a
    running head's rule and a footnote's rule have the same extent, and the page's text between them."""
    regions = []
    for chain in chains:
        start = chain[0]
        for a, b in zip(chain, chain[1:]):
            if _is_prose(text_rows(glyph_lines, (a[0], a[1], a[2], b[1]))):
                if start is not a:
                    regions.append((start[0], start[1], start[2], a[1]))
                start = b
        if start is not chain[-1]:
            regions.append((start[0], start[1], start[2], chain[-1][1]))
    return regions


def text_rows(glyph_lines: list[list[Glyph]], box) -> list[TextRow]:
    """The printed lines inside box, top to bottom, each cut into segments where a gap wider than a word
    space runs (the cells of a table's row)."""
    return [_text_row(row) for row in baseline_rows(glyph_lines, lambda g: inside(g, box))]


def baseline_rows(glyph_lines: list[list[Glyph]], keep) -> list[list[Glyph]]:
    """The visible glyphs that `keep` accepts as printed lines, top to bottom: MuPDF's lines on one baseline
    joined (the cells of a row, two columns' lines side by side), scripts with their line."""
    pieces = [kept for line in glyph_lines if (kept := [g for g in line if not g.c.isspace() and keep(g)])]
    rows: list[list[Glyph]] = []
    for piece in sorted(pieces, key=_baseline):
        if rows and abs(_baseline(rows[-1]) - _baseline(piece)) < 0.3 * max(g.size for g in piece):
            rows[-1].extend(piece)
        else:
            rows.append(piece)
    return _scripts_to_their_lines(rows)


def _scripts_to_their_lines(rows: list[list[Glyph]]) -> list[list[Glyph]]:
    """A row of only small glyphs within the height of a row of larger ones (scripts that MuPDF set apart
    from their line) joins that row."""
    # each row's largest size and vertical extent, kept up to date as rows join: over a whole page's rows,
    # recomputing them for every pair took longer than the rest of the page
    stats = {id(r): [max(g.size for g in r), min(g.y0 for g in r), max(g.y1 for g in r)] for r in rows}
    keep = list(rows)
    for row in rows:
        size, mid = stats[id(row)][0], statistics.median((g.y0 + g.y1) / 2 for g in row)
        host = next((x for x in keep if x is not row and size < 0.85 * stats[id(x)][0]
                     and stats[id(x)][1] < mid < stats[id(x)][2]), None)
        if host is not None:
            host.extend(row)
            h, r = stats[id(host)], stats[id(row)]
            stats[id(host)] = [max(h[0], r[0]), min(h[1], r[1]), max(h[2], r[2])]
            keep = [x for x in keep if x is not row]
    return keep


def _text_row(glyphs: list[Glyph]) -> TextRow:
    glyphs = sorted(glyphs, key=lambda g: g.x0)
    size = max(g.size for g in glyphs)
    space = word_threshold(glyphs, size)
    segments = [[glyphs[0].x0, glyphs[0].x1, 1]]
    for a, b in zip(glyphs, glyphs[1:]):
        if b.x0 - a.x1 > CELL_GAP_EM * size:
            segments.append([b.x0, b.x1, 1])
        else:
            segments[-1][1] = max(segments[-1][1], b.x1)
            segments[-1][2] += b.x0 - a.x1 > space
    return TextRow(min(g.y0 for g in glyphs), max(g.y1 for g in glyphs), [tuple(x) for x in segments])


def grid_columns(rows: list[TextRow]) -> list[tuple[float, float]] | None:
    """Column extents from the rows with the most cells; None where they overlap (no grid)."""
    most = max(len(r.segments) for r in rows)
    full = [r for r in rows if len(r.segments) == most]
    if most < 2 or len(full) < 2:
        return None
    columns = [(min(r.segments[i][0] for r in full), max(r.segments[i][1] for r in full)) for i in range(most)]
    if any(a[1] >= b[0] for a, b in zip(columns, columns[1:])):
        return None
    return columns


def _row_cells(row: TextRow, columns) -> list[tuple[int, int]] | None:
    """(first, last) column of each segment, one per column the row fills; None where two segments fall
    into one column (the row does not fit the grid)."""
    spans = []
    for x0, x1, _ in row.segments:
        hit = [i for i, (c0, c1) in enumerate(columns) if x0 < c1 and x1 > c0]
        if not hit:  # in the gap between two columns: the nearer one
            hit = [min(range(len(columns)), key=lambda i: abs((columns[i][0] + columns[i][1]) / 2 - (x0 + x1) / 2))]
        spans.append((hit[0], hit[-1]))
    taken = [i for a, b in spans for i in range(a, b + 1)]
    return spans if len(taken) == len(set(taken)) else None


def grid_boxes(rows: list[TextRow], columns, box) -> list[tuple] | None:
    """Cell boxes (a spanning cell as one box, an empty cell as its own) of rows on the columns' grid."""
    xs = [box[0]] + [(a[1] + b[0]) / 2 for a, b in zip(columns, columns[1:])] + [box[2]]
    ys = [box[1]] + [(a.bottom + b.top) / 2 for a, b in zip(rows, rows[1:])] + [box[3]]
    boxes = []
    for r, row in enumerate(rows):
        spans = _row_cells(row, columns)
        if spans is None:
            return None
        filled = {i for a, b in spans for i in range(a, b + 1)}
        spans += [(i, i) for i in range(len(columns)) if i not in filled]
        boxes += [(xs[a], ys[r], xs[b + 1], ys[r + 1]) for a, b in spans]
    return boxes


def _is_prose(rows: list[TextRow]) -> bool:
    return any(w >= PROSE_WORDS for r in rows for _, _, w in r.segments)


def rule_tables(page: pymupdf.Page, glyph_lines: list[list[Glyph]], rules, taken: list[tuple]) -> list:
    """Tables ruled only across: between a top and a bottom rule of one extent, rows as printed lines,
    columns where every row leaves a gap; accepted only where each row fits the columns."""
    tables = []
    for box in table_regions(rule_chains(rules, taken), glyph_lines):
        rows = text_rows(glyph_lines, box)
        columns = grid_columns(rows) if len(rows) >= 2 else None
        boxes = grid_boxes(rows, columns, box) if columns else None
        if not boxes:
            continue
        found = page.find_tables(clip=pymupdf.Rect(box) + (-1, -1, 1, 1), paths=[], add_boxes=boxes,
                                 use_layout=False, refine=True)
        tables += [t for t in found.tables if t.row_count >= 2 and t.col_count >= 2 and t.placements]
    return tables


def inside(g: Glyph, box) -> bool:
    cx, cy = (g.x0 + g.x1) / 2, (g.y0 + g.y1) / 2
    return box[0] <= cx <= box[2] and box[1] <= cy <= box[3]


def cell_text(glyph_lines: list[list[Glyph]], box) -> str:
    lines = [Line(run) for glyphs in glyph_lines if (kept := [g for g in glyphs if inside(g, box)])
             for run in split_runs(kept)]
    lines.sort(key=lambda x: (round(x.y0), x.x0))
    return join_lines([line_text(x) for x in lines])


def table_markdown(table, glyph_lines: list[list[Glyph]]) -> str:
    """A GFM table where no cell spans, else HTML with rowspan/colspan (DeepSeek-OCR's own table format).
    Each cell once, with the text whose glyphs lie inside it."""
    rows, seen = [], set()
    for placement_row in table.placements:
        row = []
        for cell in placement_row:
            if cell is None or id(cell) in seen:
                continue
            seen.add(id(cell))
            row.append((cell_text(glyph_lines, cell.bbox), cell.rowspan, cell.colspan))
        rows.append(row)
    rows = [r for r in rows if r]
    if all(rs == 1 and cs == 1 for r in rows for _, rs, cs in r) and len({len(r) for r in rows}) == 1:
        md = ["| " + " | ".join(t.replace("|", "\\|") for t, _, _ in r) + " |" for r in rows]
        return "\n".join([md[0], "|" + "---|" * len(rows[0])] + md[1:])
    html = []
    for r in rows:
        cells = "".join(f"<td{_spans(rs, cs)}>{_escape(t)}</td>" for t, rs, cs in r)
        html.append(f"<tr>{cells}</tr>")
    return "<table>" + "".join(html) + "</table>"


def _spans(rowspan: int, colspan: int) -> str:
    return (f' rowspan="{rowspan}"' if rowspan > 1 else "") + (f' colspan="{colspan}"' if colspan > 1 else "")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# ---------------------------------------------------------------- tables without rules
#
# Columns set with tab stops or runs of spaces and no line drawn (price lists, financial statements,
# schedules): only white space marks them. MuPDF cuts its lines at such gaps, and reading order then read
# each column down the page as a column of text, one after the other. Here a table is a run of printed
# lines with vertical strips of white ("gutters") that none of them crosses; the checks in
# `_unruled_block` tell it from what has that shape too and is no table: two-column pages (their gutter
# runs down the whole page), prose whose stretched word spaces line up, lists (a gutter after the bullets),
# key: value lines (a gutter after the labels) and numbered displays (a gutter before the numbers).

# A gutter is at least this wide: three word spaces (a space is 0.25-0.28 em), beyond any word space of
# justified text; TeX's column gap (2 \tabcolsep) is 1.2 em, tab stops leave more.
GUTTER_EM = CELL_GAP_EM
# rows of one table: at most this much white between one line's box and the next (the line pitch of
# rows set at up to ~2.6 times the font size); a paragraph or a heading further away is no row of it
ROW_GAP_EM = 1.5
MIN_ROWS = 3  # rows with their own cells (header included, wrapped lines not): two aligned lines are no table
MIN_FILL = 0.6  # the rows fill this share of the cells on average, and each column holds >= 2 rows' cells
# a column's cells share a left, right or centre edge within this; a digit is 0.55 em wide, so numbers
# aligned on their decimal point (1.5 over 12.25) count as flush right
ALIGN_EM = 0.6
# two columns this wide a share of the page's text each, of similar width, their lines filling them: a
# page set in two columns, not a two-column table (and each column read down, as reading_order does)
TEXT_COLUMN_SHARE = 0.3
NUMBER = re.compile(r"[-−+±(\[]?[$€£¥]?\d[\d.,:/'’\u00a0\u2009 –-]*%?[)\]]?")
LIST_LABEL = re.compile(r"[" + BULLETS.replace("–", "") + r"]|\(?(\d{1,2}|[a-zA-Z]|[ivxIVX]{1,4})[.)]")
KEY_VALUE = re.compile(r"[^\W\d][^:]{0,40}:(\s.*)?")


@dataclass
class _Row:
    """One printed line across the page, cut into segments where a gap of GUTTER_EM or more runs."""
    segments: list[list[Glyph]]
    size: float
    bold: bool

    def __post_init__(self):
        self.top = min(g.y0 for s in self.segments for g in s)
        self.bottom = max(g.y1 for s in self.segments for g in s)
        self.extents = [(min(g.x0 for g in s), max(g.x1 for g in s)) for s in self.segments]

    # what only the lines of a candidate run need, made when first asked for
    @cached_property
    def base(self) -> float:
        return _baseline([g for s in self.segments for g in s])

    @cached_property
    def mid(self) -> float:
        return statistics.median((g.y0 + g.y1) / 2 for s in self.segments for g in s)

    @cached_property
    def texts(self) -> list[str]:
        return [line_text(Line(s)) for s in self.segments]

    def free(self) -> list[tuple[float, float]]:
        """The x-intervals this line leaves white, its outer margins included."""
        ends = [-1e9] + [x for e in self.extents for x in e] + [1e9]
        return list(zip(ends[::2], ends[1::2]))


def _may_have_rows(glyph_lines: list[list[Glyph]]) -> bool:
    """Whether MIN_ROWS of MuPDF's lines could be rows of cells: each either with a gap of GUTTER_EM inside
    or on about the baseline of another line (a loose bound: most pages of prose have neither, and are
    spared the rows)."""
    lines, wide = [], 0
    for glyphs in glyph_lines:
        seen = [g for g in glyphs if not g.c.isspace()]
        if not seen:
            continue
        lines.append((seen[0].base, seen[0].size))
        wide += any(b.x0 - a.x1 > GUTTER_EM * b.size for a, b in zip(seen, seen[1:]))
    lines.sort()
    shared = sum(b[0] - a[0] < 0.6 * max(a[1], b[1]) for a, b in zip(lines, lines[1:]))
    return wide + 2 * shared >= MIN_ROWS


def _page_rows(glyph_lines: list[list[Glyph]], taken: list[tuple]) -> list[_Row]:
    rows = []
    keep = (lambda g: not any(inside(g, b) for b in taken)) if taken else (lambda g: True)
    for glyphs in baseline_rows(glyph_lines, keep):
        glyphs.sort(key=lambda g: g.x0)
        size = _dominant([g.size for g in glyphs])
        segments, right = [[glyphs[0]]], glyphs[0].x1
        for g in glyphs[1:]:
            if g.x0 - right > GUTTER_EM * size:
                segments.append([g])
                right = g.x1
            else:
                segments[-1].append(g)
                right = max(right, g.x1)
        rows.append(_Row(segments, size, sum(g.bold for g in glyphs) > len(glyphs) / 2))
    return rows


def _overlap(gutters, free, width: float) -> list[tuple[float, float]]:
    return [(lo, hi) for a0, a1 in gutters for b0, b1 in free
            if (hi := min(a1, b1)) - (lo := max(a0, b0)) >= width]


def _follows(prev: _Row, row: _Row, size: float) -> bool:
    """row is the next line of a block set in one size, close enough under prev to be a table's row."""
    return abs(row.size - size) <= 0.2 * size and row.top - prev.bottom <= ROW_GAP_EM * size


def _grow(rows: list[_Row], start: int) -> tuple[int, list[tuple[float, float]]]:
    """The last row of the run from `start` down, and its gutters: each line leaves every gutter of the lines
    above it white at least GUTTER_EM wide (it may cut one in two: a column empty in the first line)."""
    size = rows[start].size
    width = GUTTER_EM * size
    gutters = list(zip([e[1] for e in rows[start].extents], [e[0] for e in rows[start].extents[1:]]))
    end = start
    for j in range(start + 1, len(rows)):
        if not _follows(rows[end], rows[j], size):
            break
        pieces = [_overlap([g], rows[j].free(), width) for g in gutters]
        if not all(pieces):
            break
        gutters, end = [p for ps in pieces for p in ps], j
    return end, gutters


def unruled_blocks(glyph_lines: list[list[Glyph]], taken: list[tuple]) -> list[Block]:
    """Tables without rules on the page (outside the boxes taken), as table blocks; aligned key: value
    lines as a block of lines, each label with its value."""
    if not _may_have_rows(glyph_lines):
        return []
    rows = _page_rows(glyph_lines, taken)
    if not any(len(r.segments) > 1 for r in rows):
        return []
    text_width = max(r.extents[-1][1] for r in rows) - min(r.extents[0][0] for r in rows)
    blocks, s, floor = [], 0, 0
    while s < len(rows):
        if len(rows[s].segments) < 2:
            s += 1
            continue
        end, gutters = _grow(rows, s)
        start = s
        if end > s and len(rows[s + 1].segments) > 1:  # a header cell spanning columns: the grid from below it
            end2, gutters2 = _grow(rows, s + 1)
            if end2 == end and len(gutters2) > len(gutters):
                start, gutters = s + 1, gutters2
        # every column needs cells in two rows of the grid: one line with wide gaps is no table
        block = _unruled_block(rows, start, end, gutters, floor, glyph_lines, text_width) if end > start else None
        if block is not None:
            blocks.append(block)
        s = floor = end + 1
    return blocks


def _column(mids: list[float], x0: float, x1: float) -> int:
    return sum(m < (x0 + x1) / 2 for m in mids)


def _header_spans(row: _Row, columns: list[tuple[float, float]], mids, size: float) -> list[tuple[int, int]] | None:
    """(first, last) column of each segment of a header line above a table's grid (columns: their content's
    extents), one of them across a gutter: a short heading, bold or centred over the columns it spans. None
    where the line does not fit the grid, or is a line of text (a sentence, a label, across all columns)."""
    if row.extents[0][0] < columns[0][0] - size or row.extents[-1][1] > columns[-1][1] + size:
        return None
    bounds = [-1e9] + list(mids) + [1e9]
    spans = []
    for (x0, x1), text in zip(row.extents, row.texts):
        hit = [i for i in range(len(columns)) if x0 < bounds[i + 1] and x1 > bounds[i]]
        a, b = hit[0], hit[-1]
        centred = abs((x0 + x1) / 2 - (columns[a][0] + columns[b][1]) / 2) <= size
        if a < b and (len(text.split()) >= PROSE_WORDS or text.endswith((".", ":")) or not (row.bold or centred)):
            return None  # a sentence, or a label introducing the lines below ("Header:"), is no column's head
        spans.append((a, b))
    taken = [i for a, b in spans for i in range(a, b + 1)]
    if len(taken) != len(set(taken)) or all(a == b for a, b in spans):
        return None
    if len(spans) == 1 and spans[0] == (0, len(columns) - 1):
        return None  # one line across all columns: a caption or a paragraph's line
    return spans


def _aligned(cells: list[tuple[float, float]], tolerance: float) -> bool:
    """The cells (x0, x1) of a column flush left, flush right or centred, all but one in five (and one
    always: a header over the column is often set otherwise)."""
    if len(cells) < 2:
        return True
    need = len(cells) - max(1, len(cells) // 5)
    for edge in ([x0 for x0, _ in cells], [x1 for _, x1 in cells], [(x0 + x1) / 2 for x0, x1 in cells]):
        ref = statistics.median(edge)
        if sum(abs(e - ref) <= tolerance for e in edge) >= need:
            return True
    return False


# where a list, the reasons why runs of aligned lines were taken for no table, with their first line's text
# (for tests and for looking into a page: `text_layer.UNRULED_TRACE = []`, label, read it)
UNRULED_TRACE: list | None = None


def _rejected(reason: str, row: _Row) -> None:
    if UNRULED_TRACE is not None:
        UNRULED_TRACE.append((reason, " ".join(row.texts)))
    return None


def _unruled_block(rows: list[_Row], start: int, end: int, gutters, floor: int, glyph_lines,
                   text_width: float) -> Block | None:
    """The run of rows start..end as a table (or key: value lines), or None where it is none. Thresholds:
    see GUTTER_EM to TEXT_COLUMN_SHARE above."""
    if not gutters:
        return None
    size = rows[start].size
    mids = [(a + b) / 2 for a, b in gutters]
    ncols = len(mids) + 1
    body = rows[start:end + 1]
    left = min(r.extents[0][0] for r in body)
    right = max(r.extents[-1][1] for r in body)
    spread = [[e for r in body for e in r.extents if _column(mids, *e) == c] for c in range(ncols)]
    columns = [(min(e[0] for e in es), max(e[1] for e in es)) if es else (a, b)
               for es, a, b in zip(spread, [left] + list(mids), list(mids) + [right])]
    # header lines above the grid whose cells span columns (at most two)
    headers: list[tuple[_Row, list[tuple[int, int]]]] = []
    k = start - 1
    while k >= max(floor, start - 2) and _follows(rows[k], rows[k + 1], size) and \
            abs(rows[k].size - size) <= 0.2 * size:
        spans = _header_spans(rows[k], columns, mids, size)
        if spans is None:
            break
        headers.insert(0, (rows[k], spans))
        k -= 1
    first = k + 1
    # each body line's cells: column -> text, and its segments' extents
    cells = []
    for r in body:
        line: dict[int, list] = {}
        for ext, text in zip(r.extents, r.texts):
            line.setdefault(_column(mids, *ext), []).append((ext, text))
        cells.append(line)
    # the pitch of rows: between consecutive lines that both have cells in two columns or more
    pitches = [b.base - a.base for a, b, ca, cb in zip(body, body[1:], cells, cells[1:]) if len(ca) > 1 < len(cb)]
    pitch = statistics.median(pitches) if pitches else None
    # a line of one cell wrapped in its column (the row's other cells empty, no number) joins the row above;
    # not one further below than the rows are apart (a line under the table)
    groups: list[list[int]] = []
    for i, line in enumerate(cells):
        col = next(iter(line)) if len(line) == 1 else None
        wrapped = (groups and col is not None and col in cells[groups[-1][0]]
                   and not NUMBER.fullmatch(" ".join(t for _, t in line[col]))
                   and (pitch is None or body[i].base - body[i - 1].base <= 1.1 * pitch))
        if wrapped:
            groups[-1].append(i)
        else:
            groups.append([i])
    while groups and len(cells[groups[-1][0]]) < 2:  # a line under the table, not a row of it
        groups.pop()
    if not groups:
        return _rejected("no row", rows[start])
    body, cells = body[:groups[-1][-1] + 1], cells[:groups[-1][-1] + 1]
    last = start + len(body) - 1
    main = [cells[g[0]] for g in groups]  # each row's first line

    def texts(col, lines=main):
        return [" ".join(t for _, t in line[col]) for line in lines if col in line]

    # geometry: enough rows, most cells filled, every column aligned
    filled = sum(b - a + 1 for _, spans in headers for a, b in spans) + sum(len(line) for line in main)
    if len(headers) + len(main) < MIN_ROWS or filled < MIN_FILL * ncols * (len(headers) + len(main)):
        return _rejected("few rows or cells", rows[start])
    if any(sum(col in line for line in main) < 2 for col in range(ncols)):
        return _rejected("a column of one cell", rows[start])
    for col in range(ncols):
        extents = [(min(e[0] for e, _ in line[col]), max(e[1] for e, _ in line[col])) for line in main
                   if col in line]
        if not _aligned(extents, ALIGN_EM * size):
            return _rejected("unaligned column", rows[start])
    # numeric columns (the first row left out: a header) are strong evidence of a table
    numeric = [col for col in range(ncols) if (values := texts(col, main[1:]))
               and sum(bool(NUMBER.fullmatch(t)) for t in values) >= 0.6 * len(values)]
    x0, x1 = min([left] + [h.extents[0][0] for h, _ in headers]), max([right] + [h.extents[-1][1] for h, _ in headers])
    box = (x0 - 1, rows[first].top - 1, x1 + 1, rows[last].bottom + 1)
    grid = _grid(headers, [[body[i] for i in g] for g in groups], mids, box)
    # key: value lines (labels ending in a colon, or each cell a "label: value"): lines, not a table
    labels = texts(0)
    every = [t for col in range(ncols) for t in texts(col)]
    if (ncols == 2 and sum(t.endswith(":") for t in labels) >= 0.8 * len(labels)) or \
            sum(bool(KEY_VALUE.fullmatch(t)) for t in every) >= 0.8 * len(every):
        lines = [join_lines([cell_text(glyph_lines, c.bbox) for c in row if c]) for row in grid.placements]
        _rejected("key: value lines", rows[start])
        return Block("lines", box, markdown="\n\n".join(t for t in lines if t))
    # a list: a column of bullets or numbers before the items, or items starting with one
    if sum(bool(LIST_LABEL.fullmatch(t)) for t in labels) >= 0.8 * len(labels) or any(
            sum(" " in t and bool(LIST_LABEL.fullmatch(t.split(" ", 1)[0])) for t in texts(col))
            >= 0.8 * len(texts(col)) for col in range(ncols)):
        return _rejected("list", rows[start])
    # numbered displays: equation numbers "(N)" after formulas
    if all(EQUATION_NUMBER.fullmatch(t) for t in texts(ncols - 1)) and any("=" in t for t in every):
        return _rejected("numbered displays", rows[start])
    # prose: columns of sentences (lines of many words, or of several words that fill their column)
    widths = {col: max(e[1] for line in cells if col in line for e, _ in line[col])
              - min(e[0] for line in cells if col in line for e, _ in line[col]) for col in range(ncols)}
    prose = 0
    for col in range(ncols):
        if col in numeric:
            continue
        lines = [(t, max(e[1] for e, _ in line[col]) - min(e[0] for e, _ in line[col]))
                 for line in cells if col in line for t in [" ".join(x for _, x in line[col])]]
        words = [len(t.split()) for t, _ in lines]
        full = sum(w >= 0.8 * widths[col] for _, w in lines)
        if sum(n >= PROSE_WORDS for n in words) >= len(words) / 2 or (
                statistics.mean(words) >= 3 and full >= 0.6 * len(lines)):
            prose += 1
    if 2 * prose >= ncols:
        return _rejected("prose columns", rows[start])
    # a page set in two columns: two wide columns of similar width whose lines fill them
    if ncols == 2 and not numeric and min(widths.values()) >= TEXT_COLUMN_SHARE * text_width and \
            min(widths.values()) >= 0.6 * max(widths.values()):
        fills = [statistics.median(max(e[1] for e, _ in line[col]) - min(e[0] for e, _ in line[col])
                                   for line in cells if col in line) for col in range(2)]
        if all(f >= 0.6 * widths[col] for col, f in enumerate(fills)):
            return _rejected("two text columns", rows[start])
    # without numbers and without a header set apart (bold, or spanning), the shape alone is weak evidence:
    header = bool(headers) or (body[0].bold and not any(body[g[0]].bold for g in groups[1:]))
    if not numeric and not header:
        # lines of a paragraph run on right above and right below, at the rows' pitch, across the gutters
        # (stretched word spaces lined up in a justified paragraph)
        step = pitch or statistics.median(b.base - a.base for a, b in zip(body, body[1:]))
        around = [rows[first - 1] if first > 0 else None, rows[last + 1] if last + 1 < len(rows) else None]
        if all(r is not None and len(r.segments) == 1 and abs(r.size - size) <= 0.2 * size
               and any(r.extents[0][0] < a and r.extents[0][1] > b for a, b in gutters) for r in around) and \
                abs(rows[first].base - around[0].base - step) <= 0.15 * step and \
                abs(around[1].base - rows[last].base - step) <= 0.15 * step:
            return _rejected("inside a paragraph", rows[start])
        # one more row than MIN_ROWS, and some cell of more than one word (single words in a grid are
        # what a justified line with very wide spaces cuts into)
        if len(main) < MIN_ROWS + 1 or all(len(t.split()) < 2 for t in every):
            return _rejected("weak evidence", rows[start])
    return Block("table", box, markdown=table_markdown(grid, glyph_lines))


@dataclass
class _Cell:
    bbox: tuple
    rowspan: int = 1
    colspan: int = 1


@dataclass
class _Grid:
    """A table without rules in the shape table_markdown reads from PyMuPDF's tables."""
    bbox: tuple
    placements: list[list[_Cell | None]]


def _grid(headers, groups: list[list[_Row]], mids, box) -> _Grid:
    """Cell boxes: columns split at the gutters' middles, rows at the middles between one row's last line
    and the next row's first (a wrapped cell is one box over its lines); header cells span their columns."""
    xs = [box[0]] + list(mids) + [box[2]]
    lines = [[h] for h, _ in headers] + groups
    ys = [box[1]] + [(a[-1].mid + b[0].mid) / 2 for a, b in zip(lines, lines[1:])] + [box[3]]
    placements = []
    for r, (_, spans) in enumerate(headers):
        row: list[_Cell | None] = [None] * (len(mids) + 1)
        for a, b in spans:
            row[a] = _Cell((xs[a], ys[r], xs[b + 1], ys[r + 1]), colspan=b - a + 1)
        for c in range(len(row)):
            if row[c] is None and not any(a <= c <= b for a, b in spans):
                row[c] = _Cell((xs[c], ys[r], xs[c + 1], ys[r + 1]))
        placements.append(row)
    for r in range(len(headers), len(lines)):
        placements.append([_Cell((xs[c], ys[r], xs[c + 1], ys[r + 1])) for c in range(len(mids) + 1)])
    return _Grid(box, placements)


# ---------------------------------------------------------------- blocks to Markdown

def _joins_without_space(a: str, b: str) -> bool:
    """Chinese and Japanese lines continue without a space; Korean and Latin lines with one."""
    def unspaced(c):
        return unicodedata.east_asian_width(c) in "WF" and not ("\uac00" <= c <= "\ud7a3")
    return bool(a and b) and unspaced(a[-1]) and unspaced(b[0])


def join_lines(texts: list[str]) -> str:
    out = ""
    for t in texts:
        if not t:
            continue
        out = t if not out else out + ("" if _joins_without_space(out, t) else " ") + t
    return out


def heading_level(size: float, body: float) -> int:
    return next((level for ratio, level in HEADING_RATIOS if size >= ratio * body), 0)


def starts_list_item(text: str) -> bool:
    return len(text) > 1 and text[0] in BULLETS and text[1] == " "


def _new_paragraph(prev: Line, line: Line, body: float) -> bool:
    size = max(prev.size, body)
    return (line.y0 - prev.y1 > 0.5 * size or line.y0 < prev.y0 - 0.5 * size
            or abs(line.x0 - prev.x0) > 3 * size and line.x0 > prev.x1
            or round(line.size, 1) != round(prev.size, 1))


def paragraphs(lines: list[Line], body: float) -> list[list[Line]]:
    paras = []
    for line in lines:
        text = line_text(line)
        if not paras or _new_paragraph(paras[-1][-1], line, body) or starts_list_item(text):
            paras.append([line])
        else:
            paras[-1].append(line)
    return paras


def equation_number(line: Line) -> tuple[str, Line] | None:
    """The number "(N)" set apart at the end of a display's line (attached to it by attach_numbers), and the
    line without it."""
    glyphs = line.glyphs
    m = EQUATION_NUMBER.search("".join(g.c for g in glyphs))
    if not m or m.start() == 0 or not "".join(g.c for g in glyphs[:m.start()]).strip():
        return None
    before = [g for g in glyphs[:m.start()] if not g.c.isspace()]
    if glyphs[m.start()].x0 - before[-1].x1 < SPLIT_GAP_EM * line.size:
        return None  # "g(1)": a formula's own parenthesis, not its number
    return m.group(1), Line(glyphs[:m.start()])


def is_display(lines: list[Line]) -> bool:
    """A display formula: an "=" on its first line, sub- or superscripts or a printed number "(N)", and each
    further line continuing it with an operator (as `multline` and `align` break a formula); prose lines do
    not start so."""
    texts = [line_text(x) for x in lines]
    return ("=" in texts[0] and (any(has_scripts(x) for x in lines) or equation_number(lines[-1]) is not None)
            and all(t[:1] in CONTINUATION for t in texts[1:]))


def display_markdown(lines: list[Line]) -> str:
    """One LaTeX display: its lines joined by `\\\\`, a printed equation number as `\\tag{N}`."""
    numbered = equation_number(lines[-1])
    if numbered:
        lines = lines[:-1] + [numbered[1]]
    tag = f" \\tag{{{numbered[0]}}}" if numbered else ""
    return "$$" + " \\\\ ".join(line_text(x, latex=True) for x in lines) + tag + "$$"


def paragraph_markdown(lines: list[Line], body: float) -> str:
    if is_display(lines):
        return display_markdown(lines)
    text = join_lines([line_text(x) for x in lines])
    level = heading_level(lines[0].size, body)
    if level and len(text) < 200:
        return "#" * level + " " + text
    if starts_list_item(text):
        return "- " + text[2:].strip()
    return text


def merge_same_line(lines: list[Line]) -> list[Line]:
    """Runs of one printed line that reading order put next to each other (a bullet and its text, a line
    split at a wide gap) become one line again."""
    out = []
    for line in lines:
        prev = out[-1] if out else None
        if prev and line.x0 >= prev.x1 - 1 and line.x0 - prev.x1 < 3 * prev.size and (
                min(prev.y1, line.y1) - max(prev.y0, line.y0) > 0.5 * min(prev.y1 - prev.y0, line.y1 - line.y0)):
            out[-1] = Line(prev.glyphs + line.glyphs)
        else:
            out.append(line)
    return out


def attach_labels(runs: list[list[Glyph]]) -> list[list[Glyph]]:
    """A bullet or list number set apart from its item's text (a hanging indent) joined to that text: alone,
    the column of bullets has a gutter beside it and would be read as a column of its own."""
    out = sorted(runs, key=lambda r: (r[0].x0))
    merged = True
    while merged:
        merged = False
        for a in out:
            if len([g for g in a if not g.c.isspace()]) > 3:
                continue
            size = max(g.size for g in a)
            b = next((b for b in out if b is not a and abs(b[0].base - a[-1].base) < 0.3 * size
                      and 0 <= b[0].x0 - a[-1].x1 < 3 * size), None)
            if b is not None:
                out.remove(b)
                a.extend(b)
                merged = True
                break
    return out


def attach_numbers(runs: list[list[Glyph]]) -> list[list[Glyph]]:
    """An equation number "(N)" set flush right at the margin joined to the formula on its baseline: alone,
    it is a box across the gutter's far side and reading order would take it for a column of its own."""
    out = [r for r in runs]
    for number in [r for r in runs if EQUATION_NUMBER.fullmatch("".join(g.c for g in r).strip())]:
        size = max(g.size for g in number)
        left = [r for r in out if r is not number and r[-1].x1 <= number[0].x0 and _is_math(r)
                and abs(_baseline(r) - number[-1].base) < 0.3 * size]
        if left:
            target = max(left, key=lambda r: r[-1].x1)
            target.extend(number)
            out.remove(number)
    return out


def _is_math(run: list[Glyph]) -> bool:
    """A run with a relation or operator, or with scripts (glyphs smaller than its largest)."""
    size = max(g.size for g in run)
    return any(g.c in MATH_SIGNS or g.size < 0.85 * size for g in run if not g.c.isspace())


def _baseline(run: list[Glyph]) -> float:
    """The baseline of a run's full-size glyphs (its scripts sit off it)."""
    size = max(g.size for g in run)
    return statistics.median(g.base for g in run if g.size > 0.85 * size)


def page_blocks(page: pymupdf.Page, glyph_lines: list[list[Glyph]]) -> list[Block]:
    tables = page_tables(page, glyph_lines)
    blocks = [Block("table", tuple(t.bbox), markdown=table_markdown(t, glyph_lines)) for t in tables]
    blocks += unruled_blocks(glyph_lines, [b.box for b in blocks])
    boxes = [b.box for b in blocks]
    runs = []
    for glyphs in glyph_lines:
        for run in split_runs(glyphs):
            run = [g for g in run if not any(inside(g, box) for box in boxes)]
            if run and not all(g.c.isspace() for g in run):
                runs.append(run)
    for run in attach_labels(attach_numbers(runs)):
        line = Line(run)
        blocks.append(Block("text", line.box, lines=[line]))
    for info in page.get_image_info():  # figures take part in the order: text flows around them
        x0, y0, x1, y1 = info["bbox"]
        if (x1 - x0) * (y1 - y0) > 400:
            blocks.append(Block("figure", (x0, y0, x1, y1)))
    return [blocks[i] for i in reading_order([b.box for b in blocks], [b.kind != "text" for b in blocks])]


def blocks_markdown(blocks: list[Block]) -> str:
    lines = [b.lines[0] for b in blocks if b.kind == "text"]
    body = _dominant([g.size for x in lines for g in x.glyphs if not g.c.isspace()] or [10.0])
    parts, run = [], []

    def flush():
        if run:
            parts.extend(paragraph_markdown(p, body) for p in paragraphs(merge_same_line(run), body))
            run.clear()

    for b in blocks:
        if b.kind == "text":
            run.extend(b.lines)
            continue
        flush()
        if b.kind in ("table", "lines"):
            parts.append(b.markdown)
    flush()
    return "\n\n".join(p for p in parts if p.strip())


# ---------------------------------------------------------------- the page

def page_text(page: pymupdf.Page, min_chars: int = 1) -> PageText:
    """The page as a label, or why it cannot be one."""
    glyph_lines, invisible = page_glyph_lines(page)
    visible = sum(1 for line in glyph_lines for g in line if not g.c.isspace())
    if visible < min_chars:
        return PageText("unlabeled", reason=_no_text_reason(page, invisible))
    recover_unmapped(page, glyph_lines)
    md = blocks_markdown(page_blocks(page, glyph_lines))
    bad = sum(1 for c in md if unmapped(c))
    if bad:
        return PageText("unlabeled", reason=f"text layer without Unicode for {bad} of its glyphs (no ToUnicode "
                                            "map, and the embedded font has no cmap to recover them); it needs OCR")
    if not md.strip():
        return PageText("unlabeled", reason="text layer gave no text")
    return PageText("labeled", text=md + "\n")


def _no_text_reason(page: pymupdf.Page, invisible: int) -> str:
    if invisible:
        return ("no visible text layer: only invisible text (render mode 3, an OCR layer over a scanned page), "
                "an OCR engine's guess, not a text layer; it needs OCR")
    if page.get_image_info():
        return "no text layer (image-only page)"
    if any(kind.endswith("-path") for kind, _ in page.get_bboxlog()):
        return "no text layer (drawings only)"
    return "blank page: no text, images or drawings"
