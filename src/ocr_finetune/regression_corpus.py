"""A regression corpus for the text-layer teacher: one small PDF per failure class, with its ground truth.

Every page is drawn from data held here, and the same data writes the truth Markdown, so truth and PDF
cannot disagree. The classes are the ones measured on third-party documents (issue 18): two columns around
full-width formulas, tables and figures; tables side by side; merged cells; prose lines starting with `|`;
Korean and tightly kerned Latin whose word spaces exist only as glyph positions; an invisible OCR layer over
a scan; a blank page; glyphs without Unicode (one recoverable from the embedded font, one not). And pages as
LaTeX sets them (two columns, Times, no space characters, rules as filled rectangles): a booktabs table with
a \\multicolumn header in a column, an \\hline table without vertical bars across both columns, numbered
display formulas in a column and across the page, and prose between rules of one width (no table). And
tables without any rule, columns only as aligned white space: a price list (numbers right-aligned), a
schedule with a cell wrapped onto a second line and a centred column, a statement with a header spanning
two columns; beside them what has the same shape and is no table: aligned key: value lines, and justified
prose whose stretched word spaces are as wide as a table's column gaps.

Pages that no text layer can label truthfully (scan, blank, unrecoverable glyphs) say so in `EXPECTED`:
the status and a word the reason must contain. Output is deterministic (fixed metadata, no ids).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

PAGE_W, PAGE_H = 595, 842
MARGIN = 56
GUTTER = 22
COL_W = (PAGE_W - 2 * MARGIN - GUTTER) / 2
BODY = 10
LEAD = 1.3

LEFT_A = ("Reading order decides whether a label can be learned at all. A model that sees two columns "
          "interleaved line by line learns to jump between them, and it keeps doing so on every page it reads.")
LEFT_B = ("The left column ends here, just above the element that spans the whole width of the page.")
RIGHT_A = ("The right column continues the argument with a second paragraph that is set in the same type and "
           "on the same baseline grid as the left one, so the lines of both columns sit at equal heights.")
RIGHT_B = ("Equal heights are what trips a naive horizontal cut: every gap between lines runs across both columns.")
BELOW_LEFT = ("Below the wide element the two columns start again. The reader finishes this left column first "
              "and only then moves to the right.")
BELOW_RIGHT = ("This is the last paragraph of the page, at the bottom of the right column, after everything else.")

KOREAN = ["이 소책자의 많은 부분을 새로 고쳐 썼습니다",
          "글자 사이의 간격만으로 낱말을 나누는 문서가 많습니다",
          "텍스트 층에 띄어쓰기 문자가 없어도 읽는 사람에게는 빈칸이 보입니다",
          "학습 데이터의 띄어쓰기가 틀리면 모델도 틀리게 배웁니다"]
TIGHT = ["Tight kerning pulls the letters of each word together and leaves word gaps that are narrower than "
         "a space, so an extractor that waits for a space character glues the words into one.",
         "Typesetting systems often write no space characters at all and move the pen instead."]


@dataclass
class Table:
    """Cells as (row, col, rowspan, colspan, text) on a grid of `widths` columns and `rows` rows."""

    widths: list[float]
    rows: int
    cells: list[tuple[int, int, int, int, str]]

    def merged(self) -> bool:
        return any(rs > 1 or cs > 1 for _, _, rs, cs, _ in self.cells)

    def markdown(self) -> str:
        """GFM without merged cells; HTML with rowspan/colspan (DeepSeek-OCR's own table format) with them."""
        # a cell's "\n" is a line break as printed (a wrapped cell): in the truth, one cell's text
        by_row = [sorted((c, rs, cs, t.replace("\n", " ")) for r, c, rs, cs, t in self.cells if r == i)
                  for i in range(self.rows)]
        if not self.merged():
            lines = ["| " + " | ".join(t for *_, t in row) + " |" for row in by_row]
            return "\n".join([lines[0], "|" + "---|" * len(by_row[0])] + lines[1:])
        html = []
        for row in by_row:
            cells = []
            for _, rs, cs, t in row:
                attrs = (f' rowspan="{rs}"' if rs > 1 else "") + (f' colspan="{cs}"' if cs > 1 else "")
                cells.append(f"<td{attrs}>{t}</td>")
            html.append("<tr>" + "".join(cells) + "</tr>")
        return "<table>" + "".join(html) + "</table>"


PRICES = Table([120, 80, 80], 4, [(0, 0, 1, 1, "Region"), (0, 1, 1, 1, "2024"), (0, 2, 1, 1, "2025"),
                                 (1, 0, 1, 1, "North"), (1, 1, 1, 1, "1,204"), (1, 2, 1, 1, "1,377"),
                                 (2, 0, 1, 1, "South"), (2, 1, 1, 1, "988"), (2, 2, 1, 1, "1,010"),
                                 (3, 0, 1, 1, "Total"), (3, 1, 1, 1, "2,192"), (3, 2, 1, 1, "2,387")])
LEFT_TABLE = Table([90, 60, 60], 4, [(0, 0, 1, 1, "Solvent"), (0, 1, 1, 1, "bp"), (0, 2, 1, 1, "mp"),
                                     (1, 0, 1, 1, "water"), (1, 1, 1, 1, "100"), (1, 2, 1, 1, "0"),
                                     (2, 0, 1, 1, "ethanol"), (2, 1, 1, 1, "78"), (2, 2, 1, 1, "-114"),
                                     (3, 0, 1, 1, "acetone"), (3, 1, 1, 1, "56"), (3, 2, 1, 1, "-95")])
RIGHT_TABLE = Table([80, 70, 70], 4, [(0, 0, 1, 1, "Metal"), (0, 1, 1, 1, "density"), (0, 2, 1, 1, "E (GPa)"),
                                      (1, 0, 1, 1, "iron"), (1, 1, 1, 1, "7.87"), (1, 2, 1, 1, "211"),
                                      (2, 0, 1, 1, "copper"), (2, 1, 1, 1, "8.96"), (2, 2, 1, 1, "130"),
                                      (3, 0, 1, 1, "zinc"), (3, 1, 1, 1, "7.14"), (3, 2, 1, 1, "108")])
MERGED = Table([110, 85, 85, 85, 85], 5, [
    (0, 0, 2, 1, "Model"), (0, 1, 1, 2, "English"), (0, 3, 1, 2, "Korean"),
    (1, 1, 1, 1, "CER"), (1, 2, 1, 1, "TEDS"), (1, 3, 1, 1, "CER"), (1, 4, 1, 1, "TEDS"),
    (2, 0, 2, 1, "base model without adapter"), (2, 1, 1, 1, "0.081"), (2, 2, 1, 1, "0.74"),
    (2, 3, 1, 1, "0.190"), (2, 4, 1, 1, "0.61"),
    (3, 1, 1, 1, "0.079"), (3, 2, 1, 1, "0.75"), (3, 3, 1, 1, "0.188"), (3, 4, 1, 1, "0.62"),
    (4, 0, 1, 1, "fine-tuned"), (4, 1, 1, 1, "0.032"), (4, 2, 1, 2, "0.91 (both runs)"),
    (4, 4, 1, 1, "0.88")])

# A display formula as runs: (text, "" | "sub" | "sup"). Truth: LaTeX scripts.
FORMULA = [("f(x) = a", ""), ("0", "sub"), (" + a", ""), ("1", "sub"), ("x + a", ""), ("2", "sub"), ("x", ""),
           ("2", "sup")]


def runs_latex(runs) -> str:
    return "".join(t if k == "" else f"{'_' if k == 'sub' else '^'}{{{t}}}" for t, k in runs)


def formula_latex(runs) -> str:
    return "$$" + runs_latex(runs) + "$$"


def numbered_latex(lines, number: int) -> str:
    """A numbered display (`equation`, or `multline` over several lines) as one LaTeX display: its lines
    joined by `\\\\`, the number printed at the margin as `\\tag`."""
    return "$$" + " \\\\ ".join(runs_latex(r) for r in lines) + f" \\tag{{{number}}}$$"


# LaTeX tables (issue 18: measured on real LaTeX pages, tables without vertical rules came out as loose text).
# booktabs: \toprule and \bottomrule thick, \midrule thin, a \cmidrule under the \multicolumn header only.
BOOKTABS = Table([66, 40, 40, 44], 5, [
    (0, 0, 1, 1, ""), (0, 1, 1, 2, "Accuracy"), (0, 3, 1, 1, ""),
    (1, 0, 1, 1, "Method"), (1, 1, 1, 1, "Val"), (1, 2, 1, 1, "Test"), (1, 3, 1, 1, "Time (h)"),
    (2, 0, 1, 1, "Baseline"), (2, 1, 1, 1, "0.9611"), (2, 2, 1, 1, "0.9502"), (2, 3, 1, 1, "1.2"),
    (3, 0, 1, 1, "Cavity model"), (3, 1, 1, 1, "0.9723"), (3, 2, 1, 1, "0.9688"), (3, 3, 1, 1, "3.4"),
    (4, 0, 1, 1, "Ours"), (4, 1, 1, 1, "0.9815"), (4, 2, 1, 1, "0.9790"), (4, 3, 1, 1, "2.1")])
BOOKTABS_CAPTION = "Table 1: Accuracy on the validation and test splits, and training time."
# \hline between all rows, no vertical bars (`{lrrrr}`), set across both columns (table*)
HLINES = Table([120, 70, 70, 70, 70], 5, [
    (0, 0, 1, 1, "Dataset"), (0, 1, 1, 1, "Pages"), (0, 2, 1, 1, "Tables"), (0, 3, 1, 1, "CER"),
    (0, 4, 1, 1, "TEDS"),
    (1, 0, 1, 1, "arXiv papers"), (1, 1, 1, 1, "1,200"), (1, 2, 1, 1, "310"), (1, 3, 1, 1, "0.021"),
    (1, 4, 1, 1, "0.912"),
    (2, 0, 1, 1, "Annual reports"), (2, 1, 1, 1, "860"), (2, 2, 1, 1, "1,045"), (2, 3, 1, 1, "0.034"),
    (2, 4, 1, 1, "0.874"),
    (3, 0, 1, 1, "Theses"), (3, 1, 1, 1, "2,410"), (3, 2, 1, 1, "188"), (3, 3, 1, 1, "0.018"),
    (3, 4, 1, 1, "0.935"),
    (4, 0, 1, 1, "All"), (4, 1, 1, 1, "4,470"), (4, 2, 1, 1, "1,543"), (4, 3, 1, 1, "0.024"),
    (4, 4, 1, 1, "0.893")])
HLINES_CAPTION = "Table 2: Pages, tables and scores per source of the evaluation set."
# a two-line display in one column (multline: the number on its last line) and one across the page
COLUMN_FORMULA = [[("g(x) = b", ""), ("0", "sub"), (" + b", ""), ("1", "sub"), ("x", "")],
                  [("+ b", ""), ("2", "sub"), ("x", ""), ("2", "sup"), (" + b", ""), ("3", "sub"), ("x", ""),
                   ("3", "sup")]]
WIDE_FORMULA = [[("E(x, y) = c", ""), ("0", "sub"), ("x", ""), ("2", "sup"), (" + c", ""), ("1", "sub"),
                 ("xy + c", ""), ("2", "sub"), ("y", ""), ("2", "sup"), (" + c", ""), ("3", "sub"),
                 ("(x + y)", "")]]

# Tables without rules (issue: unruled tables came out as loose lines, or their columns read one after the
# other): columns as aligned white space only, as word processors set them with tab stops.
PRICE_LIST = Table([150, 80, 70, 70], 6, [
    (0, 0, 1, 1, "Item"), (0, 1, 1, 1, "Unit"), (0, 2, 1, 1, "Price"), (0, 3, 1, 1, "Stock"),
    (1, 0, 1, 1, "Copy paper A4"), (1, 1, 1, 1, "box"), (1, 2, 1, 1, "24.50"), (1, 3, 1, 1, "120"),
    (2, 0, 1, 1, "Toner cartridge"), (2, 1, 1, 1, "piece"), (2, 2, 1, 1, "189.00"), (2, 3, 1, 1, "15"),
    (3, 0, 1, 1, "Desk stapler"), (3, 1, 1, 1, "piece"), (3, 2, 1, 1, "12.90"), (3, 3, 1, 1, "40"),
    (4, 0, 1, 1, "Envelopes C5"), (4, 1, 1, 1, "pack"), (4, 2, 1, 1, "6.75"), (4, 3, 1, 1, "1,300"),
    (5, 0, 1, 1, "Whiteboard markers"), (5, 1, 1, 1, "set"), (5, 2, 1, 1, "8.20"), (5, 3, 1, 1, "64")])
PRICE_ALIGN = "llrr"
# "\n": the cell wraps onto a second line in its column, the row's other cells empty there
SCHEDULE = Table([60, 190, 70], 6, [
    (0, 0, 1, 1, "Time"), (0, 1, 1, 1, "Session"), (0, 2, 1, 1, "Room"),
    (1, 0, 1, 1, "09:00"), (1, 1, 1, 1, "Registration"), (1, 2, 1, 1, "Foyer"),
    (2, 0, 1, 1, "09:30"), (2, 1, 1, 1, "Opening remarks and welcome\nby the programme committee"),
    (2, 2, 1, 1, "Hall A"),
    (3, 0, 1, 1, "10:15"), (3, 1, 1, 1, "Reading order in scanned books"), (3, 2, 1, 1, "Hall B"),
    (4, 0, 1, 1, "11:00"), (4, 1, 1, 1, "Coffee break"), (4, 2, 1, 1, "Foyer"),
    (5, 0, 1, 1, "11:30"), (5, 1, 1, 1, "Tables without rules"), (5, 2, 1, 1, "Hall A")])
SCHEDULE_ALIGN = "llc"
# a header cell centred over two columns (HTML with colspan in the truth), negative amounts in parentheses
STATEMENT = Table([150, 80, 80], 7, [
    (0, 0, 1, 1, ""), (0, 1, 1, 2, "Year ended 31 December"),
    (1, 0, 1, 1, "EUR thousand"), (1, 1, 1, 1, "2025"), (1, 2, 1, 1, "2024"),
    (2, 0, 1, 1, "Revenue"), (2, 1, 1, 1, "1,344"), (2, 2, 1, 1, "1,200"),
    (3, 0, 1, 1, "Cost of sales"), (3, 1, 1, 1, "(905)"), (3, 2, 1, 1, "(900)"),
    (4, 0, 1, 1, "Gross profit"), (4, 1, 1, 1, "439"), (4, 2, 1, 1, "300"),
    (5, 0, 1, 1, "Other income"), (5, 1, 1, 1, "12"), (5, 2, 1, 1, "9"),
    (6, 0, 1, 1, "Operating profit"), (6, 1, 1, 1, "451"), (6, 2, 1, 1, "309")])
STATEMENT_ALIGN = "lrr"
# what has a table's shape and is none: labels and values at a tab stop, and justified prose with stretched gaps
KEY_VALUES = [("Invoice number:", "2025-0147"), ("Date:", "12 March 2025"), ("Customer:", "Northwind Cooperative"),
              ("Payment terms:", "30 days net"), ("Delivery:", "Free of charge")]
WIDE_GAPS = ("Justification stretches interword spacing until every line reaches the right margin. "
             "Extraordinarily long compound terminology, internationalisation, "
             "electroencephalographic measurements, incomprehensibilities and uncharacteristically "
             "unpronounceable abbreviations leave narrow columns particularly vulnerable: conspicuously "
             "widened gaps appear wherever unbreakable vocabulary accumulates, although sentences continue "
             "straight across them.")
WIDE_GAPS_AFTER = "These gaps are word spaces of one sentence, not the gutters between the columns of a table."


# ---------------------------------------------------------------- drawing

class Pen:
    """Draws on one page: wrapped paragraphs (with or without space characters), ruled tables, formulas."""

    def __init__(self, page, fonts):
        self.page, self.fonts, self.embedded = page, fonts, set()
        self.deferred = None  # a list: text is collected, to be drawn in another order

    def text(self, pos, text, font, size):
        if self.deferred is not None:
            self.deferred.append((pos[1], pos[0], text, font, size))
        else:
            self.page.insert_text(pos, text, fontname=font, fontsize=size)

    def font(self, name):
        if name == "kr" and name not in self.embedded:  # embedded only where used: the whole font is 3.5 MB
            self.page.insert_font(fontname=name, fontbuffer=self.fonts[name].buffer)
            self.embedded.add(name)
        return self.fonts[name]

    def wrap(self, words, width, size, font, gap):
        f, lines, current = self.font(font), [], []
        for w in words:
            trial = current + [w]
            length = sum(f.text_length(x, fontsize=size) for x in trial) + gap * (len(trial) - 1)
            if current and length > width:
                lines.append(current)
                current = [w]
            else:
                current = trial
        return lines + ([current] if current else [])

    def paragraph(self, text, x, y, width, size=BODY, font="helv", spaced=True, word_gap=None, tracking=0.0):
        """Draw `text` wrapped to `width` from baseline y + size; return the y below it. `spaced`: real space
        characters; else each word (each glyph with `tracking`) at its position, word_gap points apart."""
        f = self.font(font)
        gap = f.text_length(" ", fontsize=size) if word_gap is None else word_gap
        for line in self.wrap(text.split(" "), width, size, font, gap):
            y += size * LEAD
            if spaced:
                self.text((x, y), " ".join(line), font, size)
                continue
            pos = x
            for word in line:
                if tracking:
                    for ch in word:
                        self.text((pos, y), ch, font, size)
                        pos += f.text_length(ch, fontsize=size) + tracking
                else:
                    self.text((pos, y), word, font, size)
                    pos += f.text_length(word, fontsize=size)
                pos += gap
        return y + size * 0.7

    def heading(self, text, x, y, size, font="hebo"):
        self.font(font)
        self.page.insert_text((x, y + size * 1.2), text, fontname=font, fontsize=size)
        return y + size * 1.2 + size * 0.6

    def table(self, t: Table, x, y, size=9):
        row_h = size * 3.2
        xs = [x]
        for w in t.widths:
            xs.append(xs[-1] + w)
        shape = self.page.new_shape()
        for r, c, rs, cs, text in t.cells:
            rect = (xs[c], y + r * row_h, xs[c + cs], y + (r + rs) * row_h)
            shape.draw_rect(rect)
            lines = self.wrap(text.split(" "), rect[2] - rect[0] - 8, size, "helv",
                              self.font("helv").text_length(" ", fontsize=size))
            top = (rect[1] + rect[3]) / 2 - len(lines) * size * LEAD / 2
            for i, line in enumerate(lines):
                self.page.insert_text((rect[0] + 4, top + (i + 0.8) * size * LEAD), " ".join(line),
                                      fontname="helv", fontsize=size)
        shape.finish(color=(0, 0, 0), width=0.7)
        shape.commit()
        return y + t.rows * row_h + 12

    def formula(self, runs, y, size=BODY + 1):
        f = self.font("helv")
        small = size * 0.7
        width = sum(f.text_length(t, fontsize=size if k == "" else small) for t, k in runs)
        pos, base = (PAGE_W - width) / 2, y + size * 1.6
        for text, kind in runs:
            s = size if kind == "" else small
            dy = {"": 0, "sub": size * 0.25, "sup": -size * 0.4}[kind]
            self.page.insert_text((pos, base + dy), text, fontname="helv", fontsize=s)
            pos += f.text_length(text, fontsize=s)
        return base + size * 1.2

    def words(self, x, y, text, font, size):
        """One line as TeX sets it: each word at its pen position, no space characters."""
        f, gap = self.font(font), self.font(font).text_length(" ", fontsize=size)
        for word in text.split(" "):
            self.text((x, y), word, font, size)
            x += f.text_length(word, fontsize=size) + gap

    def latex_table(self, t: Table, x, y, rules, header_rows=1, size=9, font="tiro"):
        """A table as LaTeX draws it: rules are filled rectangles (pdfTeX's \\hrule), no vertical rules; the
        first column flush left, the others centred in their span. `rules`: "booktabs" (\\toprule and
        \\bottomrule 0.8 pt, \\midrule 0.5 pt under the header rows, a trimmed \\cmidrule under each
        \\multicolumn header cell) or "hline" (0.4 pt between all rows). Returns the y below it."""
        f, row_h, pad = self.font(font), size * 1.6, 6  # \\tabcolsep
        xs = [x]
        for w in t.widths:
            xs.append(xs[-1] + w)
        shape = self.page.new_shape()

        def rule(x0, x1, top, width):  # each its own filled path, as pdfTeX writes them
            shape.draw_rect((x0, top, x1, top + width))
            shape.finish(color=None, fill=(0, 0, 0), width=0)

        for r, c, rs, cs, text in t.cells:
            width = f.text_length(text, fontsize=size)
            left = xs[c] + pad if c == 0 else (xs[c] + xs[c + cs] - width) / 2
            self.words(left, y + r * row_h + size * 1.15, text, font, size)
            if rules == "booktabs" and cs > 1 and r < header_rows - 1:
                rule(xs[c] + size / 2, xs[c + cs] - size / 2, y + (r + 1) * row_h - 1, 0.5)
        bottom = y + t.rows * row_h
        if rules == "booktabs":
            rule(xs[0], xs[-1], y - 2, 0.8)
            rule(xs[0], xs[-1], y + header_rows * row_h - 1, 0.5)
            rule(xs[0], xs[-1], bottom, 0.8)
        else:
            for r in range(t.rows + 1):
                rule(xs[0], xs[-1], y + r * row_h - 1, 0.4)
        shape.commit()
        return bottom + 10

    def plain_table(self, t: Table, x, y, aligns, header_rows=1, size=BODY, pitch=1.6):
        """A table without any rule: each cell's text flush left, flush right or centred in its column
        (`aligns`, one of l r c per column; a spanning cell centred over its span), the header rows bold,
        rows `pitch` sizes apart. A cell's "\\n" wraps it onto the next line (set closer, at LEAD), the row's
        other cells empty there. Returns the y below it."""
        xs, pad = [x], 6
        for w in t.widths:
            xs.append(xs[-1] + w)
        base = y + size * pitch
        for r in range(t.rows):
            cells = [c for c in t.cells if c[0] == r]
            font = "hebo" if r < header_rows else "helv"
            f = self.font(font)
            lines = 1
            for _, c, _, cs, text in cells:
                parts = text.split("\n")
                lines = max(lines, len(parts))
                for k, part in enumerate(parts):
                    width = f.text_length(part, fontsize=size)
                    align = "c" if cs > 1 else aligns[c]
                    left = {"l": xs[c] + pad, "r": xs[c + cs] - pad - width,
                            "c": (xs[c] + xs[c + cs] - width) / 2}[align]
                    if part:
                        self.text((left, base + k * size * LEAD), part, font, size)
            base += (lines - 1) * size * LEAD + size * pitch
        return base - size * pitch + size * 0.9

    def justified(self, text, x, y, width, size=BODY, font="tiro"):
        """Prose set justified as TeX sets it: each word at its pen position (no space characters), the
        spaces of each line but the last stretched until it reaches `width`. Lines of a few long words get
        gaps of an em and more, which PDF readers cut lines at. Returns the y below it."""
        f, space = self.font(font), self.font(font).text_length(" ", fontsize=size)
        lines = self.wrap(text.split(" "), width, size, font, space)
        for n, line in enumerate(lines):
            y += size * LEAD
            widths = [f.text_length(w, fontsize=size) for w in line]
            gap = (width - sum(widths)) / (len(line) - 1) if n < len(lines) - 1 and len(line) > 1 else space
            pos = x
            for word, w in zip(line, widths):
                self.text((pos, y), word, font, size)
                pos += w + gap
        return y + size * 0.7

    def display(self, lines, x0, x1, y, number, size=BODY, font="tiro"):
        """A numbered display formula centred between x0 and x1, its number "(N)" flush right at x1 on the
        last line (as `equation` and `multline` set it). Drawn at once, in writing order, as TeX does: the
        scripts between their neighbours. Returns the y below it."""
        f, small = self.font(font), size * 0.7
        deferred, self.deferred = self.deferred, None
        for n, runs in enumerate(lines):
            y += size * 1.5 if n else size * 1.8
            width = sum(f.text_length(t, fontsize=size if k == "" else small) for t, k in runs)
            pos = (x0 + x1 - width) / 2
            for text, kind in runs:
                s = size if kind == "" else small
                dy = {"": 0, "sub": size * 0.25, "sup": -size * 0.4}[kind]
                self.text((pos, y + dy), text, font, s)
                pos += f.text_length(text, fontsize=s)
        label = f"({number})"
        self.text((x1 - f.text_length(label, fontsize=size), y), label, font, size)
        self.deferred = deferred
        return y + size * 0.9


def _columns(pen, y, left, right, **style):
    """Two columns, drawn line by line across both (as some producers write them): the content stream's
    order is then no reading order, and an extractor has to find the columns from positions. A column's
    item is a paragraph's text or a function (pen, x, y) -> y that draws something else there."""
    ys, pen.deferred = [y, y], []
    for i, items in enumerate((left, right)):
        x = MARGIN + i * (COL_W + GUTTER)
        for item in items:
            ys[i] = item(pen, x, ys[i]) if callable(item) else pen.paragraph(item, x, ys[i], COL_W, **style)
    _draw_deferred(pen)
    return max(ys)


def _draw_deferred(pen):
    drawn, pen.deferred = sorted(pen.deferred), None
    for y0, x0, text, font, size in drawn:
        pen.text((x0, y0), text, font, size)


def _figure(page, y, height=90):
    import pymupdf

    pix = pymupdf.Pixmap(pymupdf.csRGB, pymupdf.IRect(0, 0, 120, 40), False)
    pix.clear_with(200)
    rect = pymupdf.Rect(MARGIN + 40, y + 6, PAGE_W - MARGIN - 40, y + 6 + height)
    page.insert_image(rect, stream=pix.tobytes("png"))
    return rect.y1 + 10


# ---------------------------------------------------------------- pages (each returns its truth Markdown)

def two_columns_formula(pen):
    y = pen.heading("Columns Around a Display Formula", MARGIN, MARGIN, 16)
    y = _columns(pen, y, [LEFT_A, LEFT_B], [RIGHT_A, RIGHT_B])
    y = pen.formula(FORMULA, y)
    _columns(pen, y, [BELOW_LEFT], [BELOW_RIGHT])
    return ["# Columns Around a Display Formula", LEFT_A, LEFT_B, RIGHT_A, RIGHT_B, formula_latex(FORMULA),
            BELOW_LEFT, BELOW_RIGHT]


def two_columns_table(pen):
    y = pen.heading("Columns Around a Table", MARGIN, MARGIN, 16)
    y = _columns(pen, y, [LEFT_A, LEFT_B], [RIGHT_A, RIGHT_B])
    y = pen.table(PRICES, (PAGE_W - sum(PRICES.widths)) / 2, y + 8)
    _columns(pen, y, [BELOW_LEFT], [BELOW_RIGHT])
    return ["# Columns Around a Table", LEFT_A, LEFT_B, RIGHT_A, RIGHT_B, PRICES.markdown(), BELOW_LEFT,
            BELOW_RIGHT]


def two_columns_figure(pen):
    y = _columns(pen, MARGIN, [LEFT_A, LEFT_B], [RIGHT_A, RIGHT_B])
    y = _figure(pen.page, y)
    _columns(pen, y, [BELOW_LEFT], [BELOW_RIGHT])
    return [LEFT_A, LEFT_B, RIGHT_A, RIGHT_B, BELOW_LEFT, BELOW_RIGHT]


def side_by_side_tables(pen):
    y = pen.heading("Two Tables Side by Side", MARGIN, MARGIN, 16)
    intro = "The boiling and melting points on the left, the metals on the right."
    y = pen.paragraph(intro, MARGIN, y, PAGE_W - 2 * MARGIN)
    end = pen.table(LEFT_TABLE, MARGIN, y + 6)
    pen.table(RIGHT_TABLE, PAGE_W - MARGIN - sum(RIGHT_TABLE.widths), y + 6)
    after = "Both tables were measured at normal pressure."
    pen.paragraph(after, MARGIN, end, PAGE_W - 2 * MARGIN)
    return ["# Two Tables Side by Side", intro, LEFT_TABLE.markdown(), RIGHT_TABLE.markdown(), after]


def merged_cells(pen):
    y = pen.heading("Merged Cells", MARGIN, MARGIN, 16)
    intro = "Header cells span two columns, and the base model row spans two rows."
    y = pen.paragraph(intro, MARGIN, y, PAGE_W - 2 * MARGIN)
    y = pen.table(MERGED, MARGIN, y + 6)
    note = "Scores are means over three seeds."
    pen.paragraph(note, MARGIN, y, PAGE_W - 2 * MARGIN)
    return ["# Merged Cells", intro, MERGED.markdown(), note]


# LaTeX pages (two columns, Times, no space characters: TeX moves the pen between words)
TEX = {"font": "tiro", "spaced": False}
TEX_A = ("We train every model for the same number of steps and report the mean over three seeds. The "
         "numbers in the table below are rounded to four digits.")
TEX_B = ("The cavity model is the slowest by far, while our method reaches the best accuracy on both splits "
         "at a moderate cost.")
TEX_C = ("Training time is measured on a single accelerator with the same batch size for all methods, so "
         "that the costs can be compared directly.")
TEX_D = ("A second table across the page and a formula follow in the next section, where the sources of the "
         "evaluation set are described.")
TEX_BELOW_LEFT = ("The scores of the theses are the highest, since their tables are small and regular.")
TEX_BELOW_RIGHT = ("Annual reports hold the most tables per page and the lowest structure scores.")


def _tex_caption(caption):
    def draw(pen, x, y):
        return pen.paragraph(caption, x, y, COL_W, **TEX)
    return draw


def _tex_table(table, rules, header_rows=1):
    def draw(pen, x, y):
        return pen.latex_table(table, x + (COL_W - sum(table.widths)) / 2, y + 6, rules, header_rows)
    return draw


def _tex_display(lines, number):
    def draw(pen, x, y):
        return pen.display(lines, x, x + COL_W, y, number)
    return draw


def latex_booktabs(pen):
    """A booktabs table (no vertical rules, rules of two weights, a \\multicolumn header over a
    \\cmidrule) at column width, its caption above, body text around it in both columns."""
    y = pen.heading("4 Experiments", MARGIN, MARGIN, 12, font="tibo")
    _columns(pen, y, [TEX_A, _tex_caption(BOOKTABS_CAPTION), _tex_table(BOOKTABS, "booktabs", 2), TEX_B],
             [TEX_C, TEX_D], **TEX)
    return ["## 4 Experiments", TEX_A, BOOKTABS_CAPTION, BOOKTABS.markdown(), TEX_B, TEX_C, TEX_D]


def latex_hlines(pen):
    """An \\hline table without vertical bars across both columns (table*), between column text."""
    y = _columns(pen, MARGIN, [TEX_A, TEX_B], [TEX_C, TEX_D], **TEX)
    f = pen.font("tiro")
    pen.words((PAGE_W - f.text_length(HLINES_CAPTION, fontsize=BODY)) / 2, y + 16, HLINES_CAPTION, "tiro", BODY)
    y = pen.latex_table(HLINES, (PAGE_W - sum(HLINES.widths)) / 2, y + 28, "hline")
    _columns(pen, y, [TEX_BELOW_LEFT], [TEX_BELOW_RIGHT], **TEX)
    return [TEX_A, TEX_B, TEX_C, TEX_D, HLINES_CAPTION, HLINES.markdown(), TEX_BELOW_LEFT, TEX_BELOW_RIGHT]


def latex_formulas(pen):
    """A two-line display numbered (1) in the left column and a display numbered (2) across the page, the
    numbers flush right at the column's and the page's margin."""
    y = _columns(pen, MARGIN, [TEX_A, _tex_display(COLUMN_FORMULA, 1), TEX_B], [TEX_C, TEX_D], **TEX)
    y = pen.display(WIDE_FORMULA, MARGIN, PAGE_W - MARGIN, y, 2)
    _columns(pen, y, [TEX_BELOW_LEFT], [TEX_BELOW_RIGHT], **TEX)
    return [TEX_A, numbered_latex(COLUMN_FORMULA, 1), TEX_B, TEX_C, TEX_D, numbered_latex(WIDE_FORMULA, 2),
            TEX_BELOW_LEFT, TEX_BELOW_RIGHT]


RUNNING_HEAD = "Journal of Examples 12 (2025) 1-9"
ABSTRACT = ("Abstract. Rules above and below an abstract, under a running head and over the footnotes are no "
            "table borders: the text between them is prose, set in one or two columns.")
FOOTNOTE = "1 The footnote rule has the width of the text block, like the rule under the running head."


def ruled_prose(pen):
    """Prose between horizontal rules of one width (running head, a ruled abstract, the footnote rule): the
    rules of a table ruled only across, around text that is no table."""
    width = PAGE_W - 2 * MARGIN
    shape = pen.page.new_shape()
    for y in (MARGIN + 14, MARGIN + 24, MARGIN + 70, PAGE_H - MARGIN - 30):
        shape.draw_rect((MARGIN, y, MARGIN + width, y + 0.4))
        shape.finish(color=None, fill=(0, 0, 0), width=0)
    shape.commit()
    pen.words(MARGIN, MARGIN + 10, RUNNING_HEAD, "tiro", 8)
    pen.paragraph(ABSTRACT, MARGIN, MARGIN + 26, width, **TEX)
    _columns(pen, MARGIN + 76, [TEX_A, TEX_B], [TEX_C, TEX_D], **TEX)
    pen.paragraph(FOOTNOTE, MARGIN, PAGE_H - MARGIN - 30, width, size=8, **TEX)
    return [RUNNING_HEAD, ABSTRACT, TEX_A, TEX_B, TEX_C, TEX_D, FOOTNOTE]


PIPE_LINES = ["|x| = 3 is small compared with the bound below.",
              "|a - b| <= |a| + |b| holds for all real numbers a and b.",
              "The bars above are absolute values, not table borders."]


def pipe_prose(pen):
    y = pen.heading("Absolute Values", MARGIN, MARGIN, 16)
    for line in PIPE_LINES:
        y = pen.paragraph(line, MARGIN, y, PAGE_W - 2 * MARGIN)
    return ["# Absolute Values"] + PIPE_LINES


def korean_positional(pen):
    y = pen.heading("띄어쓰기 없는 텍스트 층", MARGIN, MARGIN, 16, font="kr")
    for text in KOREAN:
        y = pen.paragraph(text, MARGIN, y, 200, font="kr", spaced=False, word_gap=BODY * 0.3)
    return ["# 띄어쓰기 없는 텍스트 층"] + KOREAN


def tight_latin(pen):
    y = pen.heading("Tight Kerning", MARGIN, MARGIN, 16)
    for text in TIGHT:
        y = pen.paragraph(text, MARGIN, y, PAGE_W - 2 * MARGIN, spaced=False, word_gap=BODY * 0.17,
                          tracking=-0.25)
    return ["# Tight Kerning"] + TIGHT


def _unruled_table_page(pen, title: str, intro: str, table, align, note: str) -> list[str]:
    """A heading, a paragraph, a table drawn without rules, a closing paragraph; and that page's truth."""
    y = pen.heading(title, MARGIN, MARGIN, 16)
    y = pen.paragraph(intro, MARGIN, y, PAGE_W - 2 * MARGIN)
    y = pen.plain_table(table, MARGIN, y + 4, align)
    pen.paragraph(note, MARGIN, y + 8, PAGE_W - 2 * MARGIN)
    return [f"# {title}", intro, table.markdown(), note]


def unruled_price_list(pen):
    """A price list without rules: item and unit flush left, price and stock flush right (numbers of
    different widths, so their left edges differ), a bold header; prose above and below."""
    return _unruled_table_page(pen, "Price List",
                               "Prices are in euros and include tax; stock is counted at the end of each month.",
                               PRICE_LIST, PRICE_ALIGN,
                               "Orders above 200 euros ship free of charge within the country.")


def unruled_schedule(pen):
    """A schedule without rules: one session title wraps onto a second line in its column, the room column
    is centred."""
    return _unruled_table_page(pen, "Workshop Programme",
                               "All sessions take place on the first floor of the conference centre.",
                               SCHEDULE, SCHEDULE_ALIGN, "Lunch is served in the foyer from half past twelve.")


def unruled_statement(pen):
    """An income statement without rules: a header cell centred over both year columns, amounts flush
    right, negative ones in parentheses."""
    y = pen.heading("Income Statement", MARGIN, MARGIN, 16)
    intro = "The statement below is condensed; the full version is part of the audited accounts."
    y = pen.paragraph(intro, MARGIN, y, PAGE_W - 2 * MARGIN)
    y = pen.plain_table(STATEMENT, MARGIN, y + 4, STATEMENT_ALIGN, header_rows=2)
    note = "Amounts in parentheses are costs."
    pen.paragraph(note, MARGIN, y + 8, PAGE_W - 2 * MARGIN)
    return ["# Income Statement", intro, STATEMENT.markdown(), note]


def unruled_key_values(pen):
    """Labels ending in a colon and their values at a tab stop: two aligned columns over five lines, and
    no table; each label stays with its value."""
    y = pen.heading("Delivery Note", MARGIN, MARGIN, 16)
    for key, value in KEY_VALUES:
        y += BODY * 1.6
        pen.text((MARGIN, y), key, "helv", BODY)
        pen.text((MARGIN + 110, y), value, "helv", BODY)
    after = "Please check the goods on arrival and report any damage within three days."
    pen.paragraph(after, MARGIN, y + 14, PAGE_W - 2 * MARGIN)
    return ["# Delivery Note"] + [f"{k} {v}" for k, v in KEY_VALUES] + [after]


def prose_wide_gaps(pen):
    """Justified prose in a narrow measure (TeX: no space characters): some lines have gaps of one to two
    ems, several on one line, which is the shape of a table's row; and no table."""
    y = pen.heading("Stretched Lines", MARGIN, MARGIN, 16)
    y = pen.justified(WIDE_GAPS, MARGIN, y, 230)
    pen.paragraph(WIDE_GAPS_AFTER, MARGIN, y, PAGE_W - 2 * MARGIN)
    return ["# Stretched Lines", WIDE_GAPS, WIDE_GAPS_AFTER]


SCAN_TEXT = ["Scanned Report", "This page is a picture of printed text with an OCR layer on top."]


def invisible_ocr(pen):
    import pymupdf

    picture = pymupdf.open()
    p = picture.new_page(width=PAGE_W, height=PAGE_H)
    Pen(p, pen.fonts).heading(SCAN_TEXT[0], MARGIN, MARGIN, 16)
    Pen(p, pen.fonts).paragraph(SCAN_TEXT[1], MARGIN, MARGIN + 40, PAGE_W - 2 * MARGIN)
    png = p.get_pixmap(dpi=72, colorspace=pymupdf.csGRAY).tobytes("png")
    pen.page.insert_image(pen.page.rect, stream=png)
    # the OCR engine's guess, drawn invisibly (render mode 3) where the words are
    pen.page.insert_text((MARGIN, MARGIN + 19), "Scarmed Rep0rt", fontsize=16, render_mode=3)
    pen.page.insert_text((MARGIN, MARGIN + 53), "Tbis paqe is a plcture of prlnted text witb an 0CR layer",
                         fontsize=BODY, render_mode=3)
    return ["# " + SCAN_TEXT[0], SCAN_TEXT[1]]


def blank(pen):
    return []


NO_UNICODE = "Glyphs drawn without a ToUnicode map still carry their meaning in the font."


def no_unicode(pen):
    pen.paragraph(NO_UNICODE, MARGIN, MARGIN, PAGE_W - 2 * MARGIN, font="kr")
    return [NO_UNICODE]


# name -> (page builders, subset fonts?, drop ToUnicode?)
DOCUMENTS = {
    "two_columns_formula": ([two_columns_formula], True, False),
    "two_columns_table": ([two_columns_table], True, False),
    "two_columns_figure": ([two_columns_figure], True, False),
    "side_by_side_tables": ([side_by_side_tables], True, False),
    "merged_cells": ([merged_cells], True, False),
    "latex_booktabs": ([latex_booktabs], True, False),
    "latex_hlines": ([latex_hlines], True, False),
    "latex_formulas": ([latex_formulas], True, False),
    "ruled_prose": ([ruled_prose], True, False),
    "pipe_prose": ([pipe_prose], True, False),
    "korean_positional": ([korean_positional], True, False),
    "tight_latin": ([tight_latin], True, False),
    "unruled_price_list": ([unruled_price_list], True, False),
    "unruled_schedule": ([unruled_schedule], True, False),
    "unruled_statement": ([unruled_statement], True, False),
    "unruled_key_values": ([unruled_key_values], True, False),
    "prose_wide_gaps": ([prose_wide_gaps], True, False),
    "invisible_ocr": ([invisible_ocr], True, False),
    "blank": ([blank], True, False),
    # the whole font stays embedded: its own cmap maps glyphs back to Unicode
    "no_unicode_recoverable": ([no_unicode], False, True),
    # subset without a cmap: nothing in the file says what the glyphs are
    "no_unicode_lost": ([no_unicode], True, True),
}
# what a teacher reading only the text layer must say of the pages it cannot label: (status, word in reason)
EXPECTED = {"invisible_ocr": ("unlabeled", "invisible"), "blank": ("unlabeled", "blank"),
            "no_unicode_lost": ("unlabeled", "unicode")}
TABLE_DOCS = ("two_columns_table", "side_by_side_tables", "merged_cells", "latex_booktabs", "latex_hlines",
              "unruled_price_list", "unruled_schedule", "unruled_statement")
UNRULED_TABLES = {"unruled_price_list": PRICE_LIST, "unruled_schedule": SCHEDULE, "unruled_statement": STATEMENT}


def _drop_tounicode(doc):
    for xref in range(1, doc.xref_length()):
        if doc.xref_get_key(xref, "ToUnicode")[0] != "null":
            doc.xref_set_key(xref, "ToUnicode", "null")


def build_document(name: str) -> tuple[bytes, list[str]]:
    import pymupdf

    builders, subset, drop = DOCUMENTS[name]
    # "kr", not "korea": that name is MuPDF's reserved, non-embedded Korean font, whose metrics differ
    fonts = {n: pymupdf.Font(n) for n in ("helv", "hebo", "tiro", "tibo")} | {"kr": pymupdf.Font("korea")}
    doc = pymupdf.open()
    truths = []
    for build in builders:
        page = doc.new_page(width=PAGE_W, height=PAGE_H)
        blocks = build(Pen(page, fonts))
        truths.append("\n\n".join(blocks) + "\n" if blocks else "")
    if subset:
        doc.subset_fonts()
    if drop:
        doc = pymupdf.open("pdf", doc.tobytes())
        _drop_tounicode(doc)
    doc.set_metadata({"title": name, "producer": "ocr-finetune", "creator": "ocr-finetune",
                      "creationDate": "D:20250101000000Z", "modDate": "D:20250101000000Z"})
    buf = io.BytesIO()
    doc.save(buf, garbage=4, deflate=True, no_new_id=True)
    return buf.getvalue(), truths


def write_corpus(out_dir: str | Path) -> list[Path]:
    """`pdfs/{name}.pdf`, `truth/{name}_p{N}.md` and `expected.json` under out_dir; the PDF paths."""
    out_dir = Path(out_dir)
    (out_dir / "pdfs").mkdir(parents=True, exist_ok=True)
    (out_dir / "truth").mkdir(parents=True, exist_ok=True)
    written = []
    for name in DOCUMENTS:
        pdf, truths = build_document(name)
        (out_dir / "pdfs" / f"{name}.pdf").write_bytes(pdf)
        for n, md in enumerate(truths, start=1):
            (out_dir / "truth" / f"{name}_p{n}.md").write_text(md, encoding="utf-8")
        written.append(out_dir / "pdfs" / f"{name}.pdf")
    (out_dir / "expected.json").write_text(json.dumps(EXPECTED, indent=2) + "\n", encoding="utf-8")
    return written


# ---------------------------------------------------------------- scores on the corpus

def _is_table(block: str) -> bool:
    return "<table" in block or "|---" in block


def order_inversions(reference: str, hypothesis: str, words: int = 3) -> tuple[int, int]:
    """Reading-order inversions: each text block of the reference (tables left out) is anchored by its first
    and its last `words` words, looked up in the hypothesis; an inversion is an anchor found before the
    anchor ahead of it in the reference. Blocks out of order give one, two columns read line by line give
    one per paragraph they interleave (its end lies past the next one's start). Returns (inversions,
    anchors not found)."""
    from .metrics import normalize_text

    hyp = normalize_text(hypothesis or "", markdown="strip")
    anchors = []
    for block in reference.split("\n\n"):
        if block.strip() and not _is_table(block):
            tokens = normalize_text(block, markdown="strip").split()
            anchors.append((" ".join(tokens[:words]), False))
            if len(tokens) > 2 * words:
                anchors.append((" ".join(tokens[-words:]), True))
    inversions, missing, last = 0, 0, -1
    for text, at_end in anchors:
        pos = hyp.find(text)
        if pos < 0:
            missing += 1
            continue
        pos += len(text) if at_end else 0
        if pos < last:
            inversions += 1
        last = pos
    return inversions, missing


def page_score(reference: str, hypothesis: str | None) -> dict:
    """CER, TEDS (pages with a table), reading-order inversions and unmapped characters of one output."""
    from .metrics import cer, teds
    from .teachers.text_layer import unmapped

    if hypothesis is None:
        return {"labeled": False}
    inversions, missing = order_inversions(reference, hypothesis)
    score = {"labeled": True, "cer": round(cer(reference, hypothesis), 4), "inversions": inversions,
             "runs_missing": missing, "unmapped_chars": sum(1 for c in hypothesis if unmapped(c))}
    table = teds(reference, hypothesis)
    if table is not None:
        score["teds"] = round(table, 4)
    return score


def summary(scores: list[dict]) -> dict:
    labeled = [s for s in scores if s["labeled"]]
    tables = [s["teds"] for s in labeled if "teds" in s]

    def mean(xs):
        return round(sum(xs) / len(xs), 4) if xs else None

    return {"pages": len(scores), "labeled": len(labeled), "cer_mean": mean([s["cer"] for s in labeled]),
            "teds_mean": mean(tables), "teds_min": min(tables) if tables else None, "table_pages": len(tables),
            "inversions": sum(s["inversions"] for s in labeled),
            "labels_with_unmapped": sum(1 for s in labeled if s["unmapped_chars"])}


def score_teacher(teacher, out_dir: str | Path) -> dict:
    """The teacher over the corpus (written to out_dir), scored against its truth, beside plain
    `page.get_text()` on the pages it labels; pages it must refuse are checked against EXPECTED."""
    import pymupdf

    from .teachers.base import PageInput

    out_dir = Path(out_dir)
    write_corpus(out_dir)
    pages = []
    for name in DOCUMENTS:
        with pymupdf.open(out_dir / "pdfs" / f"{name}.pdf") as doc:
            pages += [PageInput(name, n, Path(f"{name}_p{n}.png"), out_dir / "pdfs" / f"{name}.pdf")
                      for n in range(1, doc.page_count + 1)]
    ours, plain, refused = [], [], 0
    for label in teacher.label(pages):
        truth = (out_dir / "truth" / f"{label.doc}_p{label.page}.md").read_text(encoding="utf-8")
        if label.doc in EXPECTED:
            status, word = EXPECTED[label.doc]
            refused += label.status == status and word in (label.reason or "").lower()
            continue
        ours.append(page_score(truth, label.text if label.status == "labeled" else None))
        with pymupdf.open(out_dir / "pdfs" / f"{label.doc}.pdf") as doc:
            plain.append(page_score(truth, doc[label.page - 1].get_text()))
    return {**summary(ours), "plain_get_text_cer_mean": summary(plain)["cer_mean"],
            "refused_as_expected": f"{refused}/{len(EXPECTED)}"}
