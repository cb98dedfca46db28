// HTML whose [data-feature] elements report clicks to Python (explorer.ui.components.LinkedHTML):
// neighbours in a feature card, feature chips under chat replies and search results.
export function render({ model, el }) {
  const box = document.createElement('div');
  box.className = 'linked-html';
  box.innerHTML = model.html;
  box.addEventListener('click', (e) => {
    const target = e.target.closest('[data-feature]');
    if (target && box.contains(target)) {
      model.send_msg({type: 'select', feature: Number(target.dataset.feature)});
    }
  });
  model.on('html', () => { box.innerHTML = model.html; });
  el.appendChild(box);
}
