// Who is signed in, the team they act for, and their role in it.
//
// The session itself is an HttpOnly cookie the page cannot read; what the page keeps (in
// memory) is the CSRF token and the user's teams, re-read from the API on every
// navigation (`refresh`), so a changed role or a team that just became BYOC shows at once.
// Only the chosen team's id is remembered across reloads (it is no secret).

import { ApiError, api, setCsrf, setTeam, unwrap, type Me, type TeamMembership, type User } from './api/client';

const TEAM_KEY = 'nestbox.team';

export const session = $state({
  /** `true` once we know whether someone is signed in. */
  ready: false,
  user: null as User | null,
  me: null as Me | null
});

function rememberedTeam(): string | null {
  try {
    return localStorage.getItem(TEAM_KEY);
  } catch {
    return null;
  }
}

/** The membership the user acts for. */
export function current(): TeamMembership | undefined {
  const me = session.me;
  return me?.teams.find((t) => t.team.id === me.team_id);
}

/** Whether the user may manage the current team (owner or admin). */
export function canManage(): boolean {
  const role = current()?.role;
  return role === 'owner' || role === 'admin';
}

/** Re-reads the user's teams (and drops a remembered team they left). */
export async function refresh(): Promise<void> {
  try {
    session.me = await unwrap(api.GET('/v1/me'));
  } catch (e) {
    if (e instanceof ApiError && e.code === 'team_not_found') {
      switchTeam(null);
      session.me = await unwrap(api.GET('/v1/me'));
    } else {
      throw e;
    }
  }
}

/** Counts sign-ins and sign-outs: an answer about an older session must not undo a newer
 * one (a sign-in made while the page's first look at the session was still on its way). */
let epoch = 0;

/** Restores the session after a page load; `false` when nobody is signed in. */
export async function restore(): Promise<boolean> {
  const began = epoch;
  try {
    const s = await unwrap(api.GET('/v1/auth/session'));
    if (epoch !== began) return session.user !== null;
    setCsrf(s.csrf_token);
    setTeam(rememberedTeam());
    session.user = s.user;
    await refresh();
    return true;
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) {
      if (epoch !== began) return session.user !== null;
      session.user = null;
      session.me = null;
      return false;
    }
    throw e;
  } finally {
    session.ready = true;
  }
}

export async function signIn(email: string, password: string): Promise<void> {
  const s = await unwrap(api.POST('/v1/auth/session', { body: { email, password } }));
  epoch += 1;
  setCsrf(s.csrf_token);
  setTeam(rememberedTeam());
  session.user = s.user;
  await refresh();
  session.ready = true;
}

export async function signOut(): Promise<void> {
  try {
    await unwrap(api.DELETE('/v1/auth/session'));
  } finally {
    forget();
  }
}

/** Forgets the session here (it ended on the server). */
export function forget() {
  epoch += 1;
  setCsrf(null);
  session.user = null;
  session.me = null;
}

/** Acts for another team from now on (`null`: the default one). */
export function switchTeam(id: string | null) {
  setTeam(id);
  try {
    if (id) localStorage.setItem(TEAM_KEY, id);
    else localStorage.removeItem(TEAM_KEY);
  } catch {
    // Private browsing: the choice lasts until the page reloads.
  }
}
