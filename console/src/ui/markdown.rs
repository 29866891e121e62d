//! The incident report's Markdown as HTML for the web console. Hosts' output is quoted in the
//! report, and a host may be hostile: raw HTML in the Markdown is shown as text, never as
//! markup, and only http(s) links survive (the page opens them in a new tab).

use pulldown_cmark::{CowStr, Event, Options, Parser, Tag};

/// HTML for `md` that carries no markup from the Markdown's own text.
pub fn to_safe_html(md: &str) -> String {
    let options =
        Options::ENABLE_TABLES | Options::ENABLE_TASKLISTS | Options::ENABLE_STRIKETHROUGH;
    let events = Parser::new_ext(md, options).map(|ev| match ev {
        Event::Html(raw) | Event::InlineHtml(raw) => Event::Text(raw),
        Event::Start(Tag::Link {
            link_type,
            dest_url,
            title,
            id,
        }) => Event::Start(Tag::Link {
            link_type,
            dest_url: safe_url(dest_url),
            title,
            id,
        }),
        Event::Start(Tag::Image { dest_url, .. }) => {
            // No images: the CSP allows none from elsewhere; show where it pointed.
            Event::Text(CowStr::from(format!("[image: {dest_url}]")))
        }
        Event::End(pulldown_cmark::TagEnd::Image) => Event::Text(CowStr::from("")),
        other => other,
    });
    let mut html = String::new();
    pulldown_cmark::html::push_html(&mut html, events);
    html
}

fn safe_url(url: CowStr<'_>) -> CowStr<'_> {
    let lower = url.to_ascii_lowercase();
    // Not even in-page links: `#/...` is a route of the console (a host could point one at a
    // page that acts).
    if lower.starts_with("https://") || lower.starts_with("http://") {
        url
    } else {
        CowStr::from("#")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headings_tables_and_checklists_render() {
        let html = to_safe_html(
            "# Rollback report\n\n| host | outcome |\n|---|---|\n| app1 | succeeded |\n\n- [x] Verify rollback\n- [ ] Notify stakeholders\n",
        );
        assert!(html.contains("<h1>Rollback report</h1>"), "{html}");
        assert!(html.contains("<td>app1</td>"), "{html}");
        assert!(html.contains("checkbox"), "{html}");
    }

    #[test]
    fn a_hosts_html_is_shown_as_text() {
        let hostile = "output:\n\n<script>alert(1)</script>\n\nline <img src=x onerror=alert(2)> here\n\n[x](javascript:alert(3)) ![y](http://evil/p.png) [z](#/diagnose?select=role=web)\n\n```\n</code><script>alert(4)</script>\n```\n";
        let html = to_safe_html(hostile);
        for bad in [
            "<script",
            "<img",
            "javascript:",
            "onerror=alert(2)>",
            "#/diagnose",
        ] {
            assert!(!html.contains(bad), "{bad} in {html}");
        }
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{html}"
        );
        assert!(
            html.contains("&lt;img src=x onerror=alert(2)&gt;"),
            "{html}"
        );
        assert!(html.contains("[image: http://evil/p.png]"), "{html}");
    }
}
