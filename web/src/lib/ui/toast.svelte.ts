// Short messages after an action (announced to screen readers).

export const toasts = $state<{ id: number; text: string; tone: 'ok' | 'danger' }[]>([]);
let next = 0;

export function toast(text: string, tone: 'ok' | 'danger' = 'ok') {
  const id = next++;
  toasts.push({ id, text, tone });
  setTimeout(() => {
    const i = toasts.findIndex((t) => t.id === id);
    if (i >= 0) toasts.splice(i, 1);
  }, tone === 'danger' ? 8000 : 3500);
}
