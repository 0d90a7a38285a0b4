// The typed client of Nestbox's REST API, generated from the OpenAPI document
// (`npm run gen:api` writes `schema.d.ts` from `openapi/nestbox.json`).
//
// Every request goes to this origin with the browser session cookie; requests that change
// something carry the session's CSRF token, and every request names the team the user
// acts for. Errors become `ApiError`s with the API's stable code and message.

import createClient, { type Middleware } from 'openapi-fetch';
import type { components, paths } from './schema';

export type Schemas = components['schemas'];
export type Sandbox = Schemas['Sandbox'];
export type Template = Schemas['Template'];
export type Host = Schemas['Host'];
export type Me = Schemas['Me'];
export type User = Schemas['User'];
export type TeamMembership = Schemas['TeamMembership'];
export type AuditLog = Schemas['AuditLog'];
export type EntryInfo = Schemas['EntryInfo'];
export type ProcessInfo = Schemas['ProcessInfo'];
export type MetricPoint = Schemas['MetricPoint'];
export type Member = Schemas['Member'];
export type ApiKey = Schemas['ApiKey'];
export type TeamRole = Schemas['TeamRole'];
export type Build = Schemas['Build'];
export type BuildLogEntry = Schemas['BuildLogEntry'];

/** The platform team: platform admins act for it to manage platform templates. */
export const PLATFORM_TEAM = 'team-00000000-0000-0000-0000-000000000000';

/** An error answer of the API (or a failure to reach it). */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string
  ) {
    super(message);
  }
}

const state: { csrf: string | null; team: string | null; onUnauthorized: () => void } = {
  csrf: null,
  team: null,
  onUnauthorized: () => {}
};

/** The session's CSRF token (kept in memory only). */
export function setCsrf(token: string | null) {
  state.csrf = token;
}

/** The team requests act for (`null`: the user's default team). */
export function setTeam(team: string | null) {
  state.team = team;
}

export function currentTeamHeader(): string | null {
  return state.team;
}

/** Called when a request finds the session gone. */
export function onUnauthorized(f: () => void) {
  state.onUnauthorized = f;
}

/** The headers every request of ours carries. */
export function authHeaders(method: string): Record<string, string> {
  const h: Record<string, string> = {};
  if (!['GET', 'HEAD', 'OPTIONS'].includes(method.toUpperCase()) && state.csrf) {
    h['X-CSRF-Token'] = state.csrf;
  }
  if (state.team) h['X-Nestbox-Team'] = state.team;
  return h;
}

const session: Middleware = {
  onRequest({ request }) {
    for (const [k, v] of Object.entries(authHeaders(request.method))) {
      // A request may name its team itself (acting for the platform team, say).
      if (!request.headers.has(k)) request.headers.set(k, v);
    }
    return request;
  },
  onResponse({ response, request }) {
    if (response.status === 401 && !new URL(request.url).pathname.startsWith('/v1/auth/')) {
      state.onUnauthorized();
    }
    return response;
  }
};

export const api = createClient<paths>({ baseUrl: '', credentials: 'same-origin' });
api.use(session);

type Answer<T> = { data?: T; error?: unknown; response: Response };

/** The answer's data, or an `ApiError` with the API's code and message. */
export async function unwrap<T>(call: Promise<Answer<T>>): Promise<T> {
  let answer: Answer<T>;
  try {
    answer = await call;
  } catch (e) {
    throw new ApiError(0, 'network', `the server could not be reached (${(e as Error).message})`);
  }
  if (answer.error !== undefined || !answer.response.ok) {
    throw toApiError(answer.response.status, answer.error);
  }
  return answer.data as T;
}

export function toApiError(status: number, body: unknown): ApiError {
  const e = (body as { error?: { code?: string; message?: string } } | undefined)?.error;
  if (e?.code) return new ApiError(status, e.code, e.message ?? e.code);
  return new ApiError(status, 'http_' + status, `the server answered ${status}`);
}

/** A message for any thrown value. */
export function messageOf(e: unknown): string {
  if (e instanceof ApiError) return e.message;
  if (e instanceof Error) return e.message;
  return String(e);
}

/** A raw request with our headers, for what the typed client does not cover (uploads,
 * downloads of bytes). */
export async function raw(method: string, path: string, body?: BodyInit): Promise<Response> {
  const response = await fetch(path, {
    method,
    body,
    credentials: 'same-origin',
    headers: authHeaders(method)
  });
  if (!response.ok) {
    let parsed: unknown;
    try {
      parsed = await response.json();
    } catch {
      parsed = undefined;
    }
    if (response.status === 401) state.onUnauthorized();
    throw toApiError(response.status, parsed);
  }
  return response;
}
