"""Screenshot the HTML report of the bundled example with headless Chromium, for the README.

    python scripts/screenshot.py [docs/report.png]

Needs Debian's chromium (apt-get install chromium). Builds the example checkpoint if missing,
writes build/example/report.html with `factorize plan --html`, and renders it to a PNG.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "docs" / "report.png").resolve()
    example = ROOT / "build" / "example" / "model.safetensors"
    if not example.exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_example.py"), str(example)], check=True)
    page = ROOT / "build" / "example" / "report.html"
    subprocess.run([sys.executable, "-m", "factorize_cli", "plan", str(example.relative_to(ROOT)),
                    "--min-channels", "64", "--rank-policy", "params:0.5", "--html", str(page), "-q"],
                   check=True, cwd=ROOT)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", "--hide-scrollbars", "--window-size=1280,1900",
                        f"--screenshot={out}", page.as_uri()], check=True, capture_output=True, timeout=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
