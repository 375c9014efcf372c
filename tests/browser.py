"""Headless Chromium for the browser tests (the run report, the chat page): Debian's chromium and chromedriver, both
named explicitly, so nothing is looked up or downloaded. Without them a test skips, unless PIPELINE_REQUIRE_BROWSER=1
(CI), where it fails."""

import os
import shutil
from pathlib import Path

import pytest


def skip_or_fail(reason: str) -> None:
    """Skip where the browser is unavailable, unless PIPELINE_REQUIRE_BROWSER=1 (CI), where it must run."""
    if os.environ.get("PIPELINE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (PIPELINE_REQUIRE_BROWSER=1; launch/install_browser.sh installs it)")
    pytest.skip(f"{reason}; launch/install_browser.sh installs it")


def find_program(*candidates: str) -> str | None:
    for candidate in candidates:
        found = shutil.which(candidate) or (candidate if os.access(candidate, os.X_OK) else None)
        if found:
            return found
    return None


def open_headless_chromium(profile_dir: Path, window: str = "1400,900"):
    """A chromedriver session on Debian's chromium, both named explicitly (nothing is looked up or downloaded)."""
    browser = find_program("chromium", "chromium-browser")
    driver_path = find_program("chromedriver", "/usr/lib/chromium/chromedriver")
    if browser is None or driver_path is None:
        skip_or_fail(f"headless browser test needs chromium and chromedriver (found {browser} and {driver_path})")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        skip_or_fail("headless browser test needs selenium (requirements-dev.txt)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile_dir}",
        f"--window-size={window}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
