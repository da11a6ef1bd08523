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
- what a page is when it has no usable text: blank, image-only, an invisible OCR layer (render mode 3:
  its text is a guess of an OCR engine), or glyphs without Unicode that the embedded font cannot map back.
"""

from __future__ import annotations

import re
import statistics
import unicodedata
from dataclasses import dataclass, field

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
    kind: str  # text | table | figure
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
    pieces = [kept for line in glyph_lines if (kept := [g for g in line if not g.c.isspace() and inside(g, box)])]
    rows: list[list[Glyph]] = []
    for piece in sorted(pieces, key=_baseline):
        if rows and abs(_baseline(rows[-1]) - _baseline(piece)) < 0.3 * max(g.size for g in piece):
            rows[-1].extend(piece)
        else:
            rows.append(piece)
    return [_text_row(row) for row in _scripts_to_their_lines(rows)]


def _scripts_to_their_lines(rows: list[list[Glyph]]) -> list[list[Glyph]]:
    """A row of only small glyphs within the height of a row of larger ones (scripts that MuPDF set apart
    from their line) joins that row."""
    keep = list(rows)
    for row in rows:
        size, mid = max(g.size for g in row), statistics.median((g.y0 + g.y1) / 2 for g in row)
        host = next((x for x in keep if x is not row and size < 0.85 * max(g.size for g in x)
                     and min(g.y0 for g in x) < mid < max(g.y1 for g in x)), None)
        if host is not None:
            host.extend(row)
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
        if b.kind == "table":
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
