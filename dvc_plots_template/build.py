"""Rebuild ``offline.html``: DVC's plots page with vega, vega-lite and vega-embed inlined.

DVC's default page loads these three scripts from cdn.jsdelivr.net, so it is blank offline. This
template has no ``{scripts}`` placeholder (DVC then adds no CDN tags) and carries the minified
builds instead; ``.dvc/config`` points ``plots.html_template`` at it, so ``dvc plots show`` works
without network. Rebuild after fetching the packages with npm (the versions DVC 3 uses)::

    npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2
    python dvc_plots_template/build.py vega-5.20.2.tgz vega-lite-5.2.0.tgz vega-embed-6.18.2.tgz
"""

from __future__ import annotations

import hashlib
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILDS = {  # package -> minified browser build inside the npm tarball
    "vega": "package/build/vega.min.js",
    "vega-lite": "package/build/vega-lite.min.js",
    "vega-embed": "package/build/vega-embed.min.js",
}
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot (offline)</title>
<!-- Offline DVC plots template (dvc_plots_template/build.py): {provenance}.
     vega, vega-lite, vega-embed: BSD-3-Clause, (c) University of Washington Interactive Data Lab. -->
{inlined}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def main(tarballs: list[str]) -> None:
    scripts, provenance = [], []
    for package, member in BUILDS.items():
        tarball = next(
            (
                Path(t)
                for t in tarballs
                if Path(t).name.startswith(f"{package}-") and Path(t).name[len(package) + 1].isdigit()
            ),
            None,
        )
        if tarball is None:
            raise SystemExit(f"no {package}-<version>.tgz among {tarballs}")
        with tarfile.open(tarball) as tar:
            code = tar.extractfile(member).read().decode()
        for placeholder in ("{plot_divs}", "{scripts}", "{refresh_tag}", "</script"):
            if placeholder in code:
                raise SystemExit(f"{tarball}:{member} contains {placeholder!r}; it cannot be inlined")
        digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
        provenance.append(f"{tarball.name} sha256 {digest[:16]}")
        scripts.append(f'<script type="text/javascript">/* {package} */\n{code}\n</script>')
    # Literal braces of the page are doubled for str.format; DVC's own placeholders stay single.
    page = PAGE.format(
        refresh_tag="{refresh_tag}",
        plot_divs="{plot_divs}",
        provenance="; ".join(provenance),
        inlined="\n".join(scripts),
    )
    (HERE / "offline.html").write_text(page)
    print(f"wrote {HERE / 'offline.html'} ({len(page) // 1024} KiB)")


if __name__ == "__main__":
    main(sys.argv[1:])
