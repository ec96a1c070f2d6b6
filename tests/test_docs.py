"""The documentation is self-contained: every document and section that the code, the README and the report
captions cite exists in this repository."""
import re

from conftest import REPO

SOURCES = [REPO / "README.md", *REPO.glob("docs/*.md"), *REPO.glob("src/diffaudit/**/*.py"),
           *REPO.glob("workflow/**/*.smk"), *REPO.glob("workflow/report/*.rst"), REPO / "Snakefile",
           REPO / "params.yaml"]


def test_nothing_cites_documents_outside_the_repository():
    for path in SOURCES:
        text = path.read_text()
        for outside in ("METHOD.md", "DESIGN.md", "STYLE.md", "../shared"):
            assert outside not in text, f"{path.relative_to(REPO)} cites {outside}"


def test_every_cited_doc_and_section_exists():
    headings = {}
    for doc in REPO.glob("docs/*.md"):
        headings[doc.name] = set(re.findall(r"^#+ (\d+(?:\.\d+)*)\.? ", doc.read_text(), re.M))
    cited = 0
    for path in SOURCES:
        for doc, section in re.findall(r"docs/(\w+\.md)(?: §(\d+(?:\.\d+)*))?", path.read_text()):
            assert doc in headings, f"{path.relative_to(REPO)} cites docs/{doc}, which does not exist"
            if section:
                assert section in headings[doc], f"{path.relative_to(REPO)} cites docs/{doc} §{section}"
            cited += 1
    assert cited >= 10  # the code does point at the docs
