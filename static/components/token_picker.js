// A reply's tokens as clickable chips (explorer.ui.components.TokenPicker): a click marks the token
// and reports its index to Python, which explains it (attribution).
export function render({ model, el }) {
  const box = document.createElement('div');
  box.className = 'token-picker';
  box.innerHTML = model.html;
  box.addEventListener('click', (e) => {
    const target = e.target.closest('[data-token]');
    if (!target || !box.contains(target)) return;
    for (const t of box.querySelectorAll('.picked')) t.classList.remove('picked');
    target.classList.add('picked');
    model.send_msg({type: 'token', index: Number(target.dataset.token)});
  });
  model.on('html', () => { box.innerHTML = model.html; });
  el.appendChild(box);
}
