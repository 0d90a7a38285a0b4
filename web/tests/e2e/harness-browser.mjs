// Debian's Chromium, headless, driven by playwright-core (no browser is downloaded). The
// flags keep it from reaching out to the network at start-up.

import { chromium } from 'playwright-core';

/** Headless Chromium from Debian's package. */
export async function launch() {
  return chromium.launch({
    executablePath: process.env.NESTBOX_CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-dev-shm-usage',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync'
    ]
  });
}

