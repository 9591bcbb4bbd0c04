from newsbeam.transforms.article import Article
from newsbeam.transforms.clean import clean_article, html_to_text


def test_html_to_text_removes_markup_scripts_and_decodes_entities():
    html = ("<div><p>Hello &amp; welcome</p><script>alert(1)</script><style>p{}</style>"
            "<p>Second&nbsp;para with <b>bold</b> text</p><br>caf&eacute;</div>")
    # </p> then <br>: a paragraph break, kept as one blank line
    assert html_to_text(html) == "Hello & welcome\nSecond para with bold text\n\ncafé"


def test_html_to_text_normalises_whitespace_and_unicode():
    assert html_to_text("  a \t b\u00ad c  \n\n\n\n d \x07") == "a b c\n\nd"
    assert html_to_text("ﬁne") == "fine"  # NFKC folds the ligature


def test_clean_article_prefers_the_longer_text_and_drops_html():
    article = Article(title="A &amp; B", summary_html="<p>short</p>",
                      content_html="<p>the full story, much longer</p>")
    cleaned = clean_article(article)
    assert cleaned.title == "A & B"
    assert cleaned.summary == "short"
    assert cleaned.body == "the full story, much longer"
    assert cleaned.summary_html == "" and cleaned.content_html == ""


def test_clean_article_falls_back_to_summary():
    cleaned = clean_article(Article(title="t", summary_html="<p>only a summary</p>", content_html=""))
    assert cleaned.body == "only a summary"
