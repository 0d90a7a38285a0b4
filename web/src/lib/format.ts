// How numbers and times are shown.

export function bytes(n: number | null | undefined): string {
  if (n == null) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v < 10 && i > 0 ? v.toFixed(1) : Math.round(v)} ${units[i]}`;
}

export function mib(n: number): string {
  return n >= 1024 ? `${(n / 1024).toFixed(n % 1024 === 0 ? 0 : 1)} GiB` : `${n} MiB`;
}

/** "3 min", "2 h", "5 d" since a time. */
export function age(iso: string | null | undefined, now = Date.now()): string {
  if (!iso) return '—';
  const s = Math.max(0, Math.round((now - Date.parse(iso)) / 1000));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h`;
  return `${Math.floor(s / 86400)} d`;
}

export function when(iso: string | null | undefined): string {
  if (!iso) return '—';
  return new Date(iso).toLocaleString();
}

export function statusTone(status: string): 'ok' | 'warn' | 'danger' | '' {
  switch (status) {
    case 'running':
    case 'online':
    case 'active':
    case 'ready':
    case 'done':
      return 'ok';
    case 'paused':
    case 'starting':
    case 'pausing':
    case 'resuming':
    case 'pending':
    case 'draining':
    case 'building':
    case 'waiting':
      return 'warn';
    case 'error':
    case 'offline':
    case 'failed':
    case 'lost':
      return 'danger';
    default:
      return '';
  }
}
