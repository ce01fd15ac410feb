# Drives the web console in headless Chromium (Selenium and Debian's
# chromedriver): each page is loaded fresh and read once it says it has
# rendered its data. Prints what it saw as JSON for node/tests/console.rs.
#   python console_browser.py BASE_URL TOKEN DEVICE SCREENSHOT_DIR PLUGIN_FILE
import json
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

base, token, device, shots, plugin = sys.argv[1:6]


def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def ready(driver, page, timeout=15):
    WebDriverWait(driver, timeout).until(
        lambda d: d.execute_script("return document.body.dataset.ready") == page,
        message=f"page {page} never said it was ready")


def load(driver, route, page):
    """A fresh load of the console at `route` (not a hash change)."""
    driver.get("about:blank")
    driver.get(f"{base}/console#/{route}&token={token}")
    ready(driver, page)
    return {
        "ms": int(driver.execute_script("return document.body.dataset.renderMs")),
        "text": driver.find_element(By.TAG_NAME, "main").text,
        "address": driver.execute_script("return location.href"),
    }


def wait_text(driver, css, needle, timeout=15):
    WebDriverWait(driver, timeout).until(
        lambda d: needle in d.find_element(By.CSS_SELECTOR, css).text,
        message=f"{css} never showed {needle!r}")
    return driver.find_element(By.CSS_SELECTOR, css).text


out = {"pages": {}}

# Without a token: the sign-in form, and no data.
anon = browser()
try:
    anon.get(f"{base}/console#/cluster")
    ready(anon, "login")
    out["anonymous"] = {"main": anon.find_element(By.TAG_NAME, "main").text,
                        "login_shown": anon.find_element(By.ID, "login").is_displayed()}
finally:
    anon.quit()

d = browser()
try:
    page = load(d, "cluster", "cluster")
    page["shard_cells"] = len(d.find_elements(By.CSS_SELECTOR, "#shard-map .shard"))
    page["owned_cells"] = len(d.find_elements(By.CSS_SELECTOR, "#shard-map .shard:not(.unowned)"))
    # The live rate needs two samples, 2 s apart.
    rate = WebDriverWait(d, 10).until(
        lambda d: (t := d.find_element(By.ID, "ingest-rate").text) not in ("…", "?") and t)
    page["rate"] = rate
    d.save_screenshot(f"{shots}/cluster.png")
    out["pages"]["cluster"] = page

    page = load(d, f"device/{device}", "device")
    page["charts"] = [c.get_attribute("data-field") for c in d.find_elements(By.CSS_SELECTOR, "svg.chart")]
    d.save_screenshot(f"{shots}/device.png")
    out["pages"]["device"] = page

    page = load(d, "rules/new", "rules")
    d.find_element(By.ID, "rule-id").send_keys("console-rule")
    script = d.find_element(By.ID, "rule-script")
    script.send_keys("let a = 1;\nlet b = ;\n")
    d.find_element(By.ID, "rule-save").click()
    page["error"] = wait_text(d, "#rule-message.error", "line 2")
    page["marked_lines"] = [e.text for e in d.find_elements(By.CSS_SELECTOR, "#rule-gutter .bad")]
    d.save_screenshot(f"{shots}/rules-error.png")
    script.clear()
    script.send_keys("emit(payload);\n")
    d.find_element(By.ID, "rule-save").click()
    page["stored"] = wait_text(d, "#rule-message.ok", "Stored rule console-rule")
    page["listed"] = wait_text(d, "#rules", "console-rule")
    d.find_element(By.ID, "plugin-name").send_keys("console-echo")
    d.find_element(By.ID, "plugin-file").send_keys(plugin)
    d.find_element(By.CSS_SELECTOR, "#plugins button[type=submit]").click()
    page["uploaded"] = wait_text(d, "#plugin-message.ok", "Stored plugin console-echo")
    page["plugins"] = wait_text(d, "#plugins table", "console-echo")
    d.save_screenshot(f"{shots}/rules.png")
    out["pages"]["rules"] = page

    page = load(d, "tail?subject=fm.tel.>", "tail")
    request = urllib.request.Request(
        f"{base}/api/v1/devices/{device}/telemetry?channel=env/temp", data=b'{"t":99.5}',
        headers={"content-type": "application/json", "authorization": f"Bearer {token}"}, method="POST")
    sent = time.monotonic()
    urllib.request.urlopen(request, timeout=10).read()
    page["tail"] = wait_text(d, "#tail-list", device)
    page["tail_ms"] = int((time.monotonic() - sent) * 1000)
    d.save_screenshot(f"{shots}/tail.png")
    out["pages"]["tail"] = page
finally:
    d.quit()

print(json.dumps(out))
