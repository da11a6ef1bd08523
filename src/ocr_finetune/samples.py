"""Deterministic sample corpus: PDFs and their ground-truth Markdown from one source.

Each document is a list of blocks. The same blocks are laid out into a PDF page by page and written as
Markdown, so the truth cannot drift from what the PDF shows. Nothing here touches the network, and two
runs write byte-identical files (fixed metadata, no random ids), so the committed corpus can be regenerated
and checked in CI.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

# pymupdf is imported where PDFs are written: the tiny tokenizer reads this corpus's text on machines
# (the GPU box) that have no PyMuPDF.

PAGE_W, PAGE_H = 595, 842  # A4 in points
MARGIN = 56
LATIN, LATIN_BOLD, CJK = "helv", "hebo", "korea"
SIZES = {"h1": 20, "h2": 15, "p": 11, "li": 11, "td": 10}
LINE = 1.35


@dataclass
class Block:
    kind: str  # h1 | h2 | p | ul | table | columns | pagebreak
    text: str = ""
    items: list = field(default_factory=list)  # ul: [str]; table: [[str]]; columns: [[Block], [Block]]


def h1(t):
    return Block("h1", t)


def h2(t):
    return Block("h2", t)


def p(t):
    return Block("p", t)


def ul(*items):
    return Block("ul", items=list(items))


def table(*rows):
    return Block("table", items=[list(r) for r in rows])


def columns(left, right):
    return Block("columns", items=[left, right])


PAGEBREAK = Block("pagebreak")

DOCUMENTS: dict[str, dict] = {
    "annual_report": {
        "blocks": [
            h1("Annual Report 2025"),
            p("This report summarises the operations of the Northwind cooperative during the fiscal year. "
              "Revenue grew steadily while costs stayed flat, and the board approved two new programmes."),
            h2("Highlights"),
            ul("Revenue rose by twelve percent.", "Two new regional offices opened.",
               "Customer satisfaction reached a record high."),
            h2("Outlook"),
            p("The coming year will focus on logistics, training and a new inventory system. "
              "Management expects moderate growth and careful spending."),
            PAGEBREAK,
            h2("Financial Summary"),
            p("The table below lists the main figures in thousands of euros."),
            table(["Item", "2024", "2025", "Change"],
                  ["Revenue", "1200", "1344", "+12%"],
                  ["Costs", "900", "905", "+1%"],
                  ["Profit", "300", "439", "+46%"]),
            p("All figures are audited and rounded to the nearest thousand."),
            PAGEBREAK,
            h2("Governance"),
            p("The board met six times. Minutes of every meeting are available to members on request. "
              "The audit committee reviewed internal controls and found no material weakness."),
            ul("Chair: Maria Lopez", "Treasurer: Jonas Berg", "Secretary: Aiko Tanaka"),
        ],
    },
    "korean_memo": {
        "blocks": [
            h1("업무 안내문"),
            p("이번 분기에는 문서 관리 시스템을 새로 도입합니다. 모든 직원은 교육에 참여해 주시기 바랍니다."),
            h2("일정"),
            ul("교육 신청: 3월 4일까지", "1차 교육: 3월 11일", "시스템 전환: 4월 1일"),
            h2("문의"),
            p("궁금한 점은 정보기술팀으로 연락해 주십시오. 감사합니다."),
        ],
    },
    "price_table": {
        "blocks": [
            h1("Price List"),
            p("Prices are valid from January and include tax."),
            table(["Product", "Unit", "Price", "Stock"],
                  ["Paper A4", "box", "24.50", "120"],
                  ["Toner black", "piece", "89.00", "15"],
                  ["Stapler", "piece", "12.90", "40"],
                  ["Envelopes", "pack", "6.75", "300"]),
            p("Orders above 200 euros ship free of charge."),
        ],
    },
    "two_column_news": {
        "blocks": [
            h1("Community Newsletter"),
            columns(
                [h2("Garden Project"),
                 p("Volunteers planted forty trees along the river path last weekend. "
                   "The city provided tools and water, and local schools joined in the afternoon."),
                 p("More planting days are planned for the spring.")],
                [h2("Library Hours"),
                 p("The public library extends its opening hours on Thursdays until nine in the evening. "
                   "A new reading room for students opens next month."),
                 p("Membership remains free for residents.")],
            ),
        ],
    },
    "scanned_letter": {
        "image_only": True,
        "blocks": [
            h1("Letter of Confirmation"),
            p("We confirm that the shipment arrived complete and undamaged. "
              "Thank you for the quick delivery and the clear paperwork."),
            p("Kind regards, the receiving team."),
        ],
    },
    "bilingual_schedule": {
        "blocks": [
            h1("회의 일정 Meeting Schedule"),
            p("다음 회의는 본사 대회의실에서 열립니다. The next meetings take place in the main hall."),
            table(["날짜 Date", "주제 Topic", "담당 Owner"],
                  ["3월 5일", "예산 Budget", "김민수"],
                  ["3월 19일", "채용 Hiring", "이지은"],
                  ["4월 2일", "보안 Security", "박서준"]),
            ul("자료는 하루 전에 공유합니다.", "Slides are shared one day before."),
        ],
    },
}


def _has_cjk(text: str) -> bool:
    return any(ord(c) > 0x2E80 for c in text)


class _Layout:
    """A y-cursor page writer: wraps text to a column width and starts a new page when full."""

    def __init__(self, doc: pymupdf.Document):
        import pymupdf

        self.doc = doc
        self.fonts = {LATIN: pymupdf.Font(LATIN), LATIN_BOLD: pymupdf.Font(LATIN_BOLD), CJK: pymupdf.Font(CJK)}
        self.page = None
        self.new_page()

    def new_page(self):
        self.page = self.doc.new_page(width=PAGE_W, height=PAGE_H)
        self.y = MARGIN

    def font_for(self, text, bold=False):
        if _has_cjk(text):
            return CJK
        return LATIN_BOLD if bold else LATIN

    def wrap(self, text, font, size, width):
        f = self.fonts[font]
        lines, current = [], ""
        # CJK text wraps at spaces too: every sample sentence has them.
        for word in text.split(" "):
            trial = f"{current} {word}".strip()
            if current and f.text_length(trial, fontsize=size) > width:
                lines.append(current)
                current = word
            else:
                current = trial
        if current:
            lines.append(current)
        return lines

    def text(self, x, y, s, size, bold=False):
        font = self.font_for(s, bold)
        if font == CJK:
            self.page.insert_font(fontname="kr", fontbuffer=self.fonts[CJK].buffer)
            self.page.insert_text((x, y), s, fontname="kr", fontsize=size)
        else:
            self.page.insert_text((x, y), s, fontname=font, fontsize=size)

    def paragraph(self, s, size, x0, width, bold=False, y=None, gap=0.6):
        y = self.y if y is None else y
        font = self.font_for(s, bold)
        for line in self.wrap(s, font, size, width):
            y += size * LINE
            self.text(x0, y, line, size, bold)
        return y + size * gap

    def block(self, b: Block, x0=MARGIN, width=PAGE_W - 2 * MARGIN, y=None):
        y = self.y if y is None else y
        if b.kind in ("h1", "h2"):
            y = self.paragraph(b.text, SIZES[b.kind], x0, width, bold=True, y=y + 4)
        elif b.kind == "p":
            y = self.paragraph(b.text, SIZES["p"], x0, width, y=y)
        elif b.kind == "ul":
            for item in b.items:
                self.text(x0 + 4, y + SIZES["li"] * LINE, "\u2022", SIZES["li"])
                y = self.paragraph(item, SIZES["li"], x0 + 18, width - 18, y=y, gap=0.2)
            y += 6
        elif b.kind == "table":
            y = self.table(b.items, x0, width, y)
        return y

    def table(self, rows, x0, width, y):
        size, row_h = SIZES["td"], SIZES["td"] * 2.2
        col_w = width / len(rows[0])
        top = y + 4
        for r, row in enumerate(rows):
            for c, cell in enumerate(row):
                self.text(x0 + c * col_w + 5, top + r * row_h + row_h * 0.68, cell, size, bold=(r == 0))
        bottom = top + len(rows) * row_h
        shape = self.page.new_shape()
        for r in range(len(rows) + 1):  # ruled grid: what a real table in a PDF looks like
            shape.draw_line((x0, top + r * row_h), (x0 + width, top + r * row_h))
        for c in range(len(rows[0]) + 1):
            shape.draw_line((x0 + c * col_w, top), (x0 + c * col_w, bottom))
        shape.finish(color=(0, 0, 0), width=0.8)
        shape.commit()
        return bottom + 14

    def add(self, b: Block):
        if b.kind == "pagebreak":
            self.new_page()
        elif b.kind == "columns":
            gutter = 24
            w = (PAGE_W - 2 * MARGIN - gutter) / 2
            ys = []
            for i, col in enumerate(b.items):
                y = self.y
                for inner in col:
                    y = self.block(inner, x0=MARGIN + i * (w + gutter), width=w, y=y)
                ys.append(y)
            self.y = max(ys)
        else:
            self.y = self.block(b)


def block_markdown(b: Block) -> str:
    if b.kind == "h1":
        return f"# {b.text}"
    if b.kind == "h2":
        return f"## {b.text}"
    if b.kind == "p":
        return b.text
    if b.kind == "ul":
        return "\n".join(f"- {i}" for i in b.items)
    if b.kind == "table":
        head, *body = b.items
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    if b.kind == "columns":  # reading order: left column, then right column
        return "\n\n".join(block_markdown(x) for col in b.items for x in col)
    raise ValueError(b.kind)


def pages_markdown(blocks: list[Block]) -> list[str]:
    pages, current = [], []
    for b in blocks:
        if b.kind == "pagebreak":
            pages.append(current)
            current = []
        else:
            current.append(block_markdown(b))
    pages.append(current)
    return ["\n\n".join(x) + "\n" for x in pages]


def _fixed(doc: pymupdf.Document, title: str):
    doc.set_metadata({"title": title, "author": "ocr-finetune samples", "creator": "ocr-finetune",
                      "producer": "ocr-finetune", "creationDate": "D:20250101000000Z",
                      "modDate": "D:20250101000000Z"})


def build_document(name: str, spec: dict, image_dpi: int = 110) -> bytes:
    import pymupdf

    doc = pymupdf.open()
    layout = _Layout(doc)
    for b in spec["blocks"]:
        layout.add(b)
    doc.subset_fonts()  # the CJK font is 3.5 MB whole; the subset is a few KB
    if spec.get("image_only"):
        # A scan: each page becomes a picture, with no text layer left to read.
        scan = pymupdf.open()
        for page in doc:
            png = page.get_pixmap(dpi=image_dpi, colorspace=pymupdf.csGRAY).tobytes("png")
            out = scan.new_page(width=page.rect.width, height=page.rect.height)
            out.insert_image(out.rect, stream=png)
        doc = scan
    _fixed(doc, name)
    buf = io.BytesIO()
    doc.save(buf, garbage=4, deflate=True, no_new_id=True)
    return buf.getvalue()


def write_corpus(out_dir: Path, documents: dict[str, dict] | None = None) -> list[Path]:
    """Write `pdfs/{name}.pdf` and `truth/{name}_p{N}.md` under out_dir; return the PDF paths."""
    out_dir = Path(out_dir)
    (out_dir / "pdfs").mkdir(parents=True, exist_ok=True)
    (out_dir / "truth").mkdir(parents=True, exist_ok=True)
    written = []
    for name, spec in (documents or DOCUMENTS).items():
        pdf = out_dir / "pdfs" / f"{name}.pdf"
        pdf.write_bytes(build_document(name, spec))
        for n, md in enumerate(pages_markdown(spec["blocks"]), start=1):
            (out_dir / "truth" / f"{name}_p{n}.md").write_text(md, encoding="utf-8")
        written.append(pdf)
    return written
