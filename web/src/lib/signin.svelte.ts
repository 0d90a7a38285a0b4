// The guard of the pages that need someone signed in.

import { afterNavigate, goto } from '$app/navigation';
import { page } from '$app/state';
import { session } from './session.svelte';

/** Sends a visitor who is not signed in to the sign-in page (coming back here after). Call
 * while a layout is being set up. The check runs once the session is known and again after
 * every navigation: a redirect asked for while the page's first navigation is still under
 * way can be overtaken by it, and the check after that navigation makes up for it. */
export function requireSignIn() {
  const check = () => {
    if (session.ready && !session.user) {
      goto(`/login?next=${encodeURIComponent(page.url.pathname + page.url.search)}`, { replaceState: true });
    }
  };
  $effect(check);
  afterNavigate(check);
}
